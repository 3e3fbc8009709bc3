"""Map a trained model over every chunk of a store into a catalogue (``xpbatch encode-catalog``).

- :mod:`~xpbatch.encode.kernel`: the pure per-chunk kernel (one input chunk in, its rows out).
- :mod:`~xpbatch.encode.cpu`: the kernel's steps around the network fused for the CPU.
- :mod:`~xpbatch.encode.outputs`: what a chunk brings in and what comes out (names, shapes, checks).
- :mod:`~xpbatch.encode.mc`: Monte-Carlo latents, measurement noise propagated (``--mc-samples``).
- :mod:`~xpbatch.encode.workers`: what each worker process keeps (the model on its device).
- :mod:`~xpbatch.encode.stage`: the stage entry :func:`~xpbatch.encode.stage.encode_catalog`.
"""
