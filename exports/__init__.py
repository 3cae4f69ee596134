"""ONNX export, precision variants and the edge runtime.

Modules (import them directly; this package imports nothing so that the edge runtime stays
free of torch):

* ``interface``   graph names, inputs, outputs and dynamic axes, declared once
* ``onnx_export`` torch -> ONNX for image / text / fused zero-shot graphs, optimum export, parity
* ``precision``   fp16, int8 dynamic and int8 static (QDQ) variants of an fp32 graph
* ``bundle``      write a self-verifying zero-shot bundle for edge devices
* ``runtime``     onnxruntime + numpy + pillow only: sessions, ``load_bundle``, ``BundleClassifier``
* ``predict``     ``python -m exports.predict BUNDLE IMAGE...``
* ``parity``      the parity report of every variant against the teacher and the torch student (a package)
* ``pipeline``    the step after training: export, parity, bundle
"""
