"""Pipeline stages: each module exposes ``run(cfg, ...)``, a plain function with a typed config in and URIs out.

The CLI, the KFP components and the tests all call these functions; nothing here knows about Kubeflow.
"""
