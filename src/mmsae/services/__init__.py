"""Local stand-ins for the cluster's services, run as child processes on 127.0.0.1.

``mmsae.services.s3.S3Server`` runs a SeaweedFS S3 server (``weed mini``) and
``mmsae.services.mlflow_server.MlflowServer`` an MLflow tracking server; the local services mode and the
tests use them. Import the submodules directly, so that using one does not load the other.
"""
