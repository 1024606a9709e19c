"""Components that open and close the MLflow parent run of a pipeline run."""

from kfp import dsl

from mmsae.components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def open_tracking(config_yaml: str, run_name: str, kfp_job_id: str, kfp_job_name: str) -> str:
    """Open the pipeline's MLflow parent run; returns its run id ('' when tracking is off)."""
    from mmsae import tracking
    from mmsae.config import config_from_yaml

    cfg = config_from_yaml(config_yaml)
    if not cfg.tracking.enabled:
        return ""
    return tracking.start_pipeline_run(
        run_name or cfg.run.name,
        params={"workdir": cfg.run.workdir},
        uri=cfg.tracking.uri,
        experiment=cfg.tracking.experiment,
        kfp_job_id=kfp_job_id,
        kfp_job_name=kfp_job_name,
    )


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def close_tracking(config_yaml: str, kfp_job_id: str, status: dsl.PipelineTaskFinalStatus):
    """Close the parent run as FINISHED, KILLED (a cancelled run) or FAILED after every other step.

    An exit task may not depend on other tasks, so the parent run is found by its ``kfp.job_id`` tag.
    """
    from mmsae import tracking
    from mmsae.config import config_from_yaml

    cfg = config_from_yaml(config_yaml)
    if not cfg.tracking.enabled:
        return
    run_id = tracking.find_pipeline_run(
        kfp_job_id, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment
    )
    if run_id is None:
        return
    state = {"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED"}.get(status.state, "FAILED")
    tracking.end_pipeline_run(run_id, status=state, uri=cfg.tracking.uri)
