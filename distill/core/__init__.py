"""The core every other layer stands on: it imports nothing of the project above it.

* ``dual_encoder``  the :class:`DualEncoder` protocol every teacher, student and export speaks;
  ``HFDualEncoder`` for transformers models; the tower/head split of a dual encoder
* ``towers``        the reference dual encoder from pip-installed pretrained towers
* ``loading``       ``load_dual_encoder`` / ``load_teacher``: a hub id or directory -> a dual encoder
* ``imaging``, ``augment``  torch-free decoding and preprocessing; seeded views and student jitter
* ``data``, ``classnames``  dataset loading, column detection, class names
* ``templates``, ``zeroshot``  prompt sets and zero-shot heads
* ``metrics``, ``linear_probe``, ``flops``  evaluation metrics, the linear probe, model cost
* ``losses``, ``dist``  distillation and contrastive losses; gathers with autograd
* ``cache``         the on-disk cache of teacher targets and tower features
* ``testing``       tiny models and tokenizers built on the fly for tests and benchmarks

Above it: ``students/`` and ``exports/`` import the core; the application modules in
``distill/`` (config, task, training data, contrastive mode, trainer, evaluation) import all three.
"""
