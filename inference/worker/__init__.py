"""What runs on a Dask worker: the resident model and everything a batch does there.

    plugin         the WorkerPlugin that keeps the model resident, and the batch task
    runtime        one batch: fetch, decode, the forward pass, the records
    forward        which forward the model runs (eager, a compiled package, a CUDA graph)
    compiled       compiled CPU packages: built in the background, loaded between batches
    package_build  the process that builds a package (``python -m inference.worker.package_build``)
    model          loading the model and its weights
    decoding       a batch's images to crops: the decode pool, the device decoder
    decoders       the decoder processes the worker kills at an image's deadline
    images         decoding and preprocessing untrusted image bytes (what a decoder process runs)
    gpu            decoding on the GPU
    fetch          reading objects from S3 and local paths
    children       the environment a child process gets (no credentials)
    cachedir       private cache folders for native code (compiled packages, torch.compile's caches)
    cpu            what /proc/cpuinfo says (native bf16, the packages' key)

Imports ``inference.records``, ``inference.settings`` and ``inference.errors``; never
``inference.client``. ``plugin`` imports torch only when a model is set up, so the caller's
process can import it to register the plugin.
"""
