"""Training SAEs on activation shards: the parts the train stage (:mod:`mmsae.stages.train`) puts together.

- :mod:`~mmsae.training.stream`: the batch stream over the shards (shuffled, resumable, split over ranks).
- :mod:`~mmsae.training.engine`: the process group, the module DeepSpeed trains (every SAE of a run), its
  engine and the learning-rate schedule.
- :mod:`~mmsae.training.state`: the training states a run resumes from, and the key they belong to.
- :mod:`~mmsae.training.evaluation`: held-out FVU and the LM loss with an SAE spliced in.
- :mod:`~mmsae.training.loop`: the training loop.
"""


class TrainError(RuntimeError):
    """Training cannot start or go on; the message says what is wrong with which input."""
