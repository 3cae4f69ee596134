"""The core every other package stands on: it imports nothing of the project above it.

* ``dual_encoder``  the :class:`DualEncoder` protocol every teacher, student and exported model
  speaks; ``HFDualEncoder`` for transformers models; ``TowerSplit``, a dual encoder as tower -> head
* ``towers``        the reference dual encoder from pip-installed pretrained towers
* ``loading``       ``load_dual_encoder`` / ``load_teacher``: a hub id or directory -> a dual encoder
* ``imaging``, ``augment``  torch-free decoding and preprocessing; seeded views, student jitter
* ``data``, ``classnames``  dataset loading, column detection, class names
* ``templates``, ``zeroshot``  prompt sets and zero-shot heads
* ``metrics``, ``linear_probe``, ``flops``  evaluation metrics, the linear probe, model cost
* ``bootstrap``, ``proportions``  confidence intervals of benchmark scores (per-query resamples) and of a
  parity report's agreements (Wilson, torch-free)
* ``losses``, ``dist``  distillation and contrastive losses; gathers with autograd
* ``cache``         the on-disk cache of teacher targets and tower features
* ``compat``        the one place that knows the transformers major (4.x or 5.x)
* ``testing``       tiny models and tokenizers built on the fly for tests and benchmarks

The layers above: ``students/`` and ``exports/`` import the core; ``distill/`` (config, task,
training data, contrastive mode, the trainer, evaluation) imports all three.
"""
