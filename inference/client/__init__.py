"""What runs in the caller's process: the stream worker, the commands, a notebook.

    cluster      the connection to the Dask cluster: register the model, submit batches
    embedded     the cluster visionstream starts itself when no scheduler is given
    deaths       which batches were on Dask workers that died (poison isolation's evidence)
    isolation    the cluster-wide lease one stream worker holds while it isolates a worker-killer
    health       which workers' model failed to load, and for how long batches avoid them
    retirement   which model plugins a newer configuration supersedes
    job          a whole job (classify, backfill) as batches in flight, with progress
    sources      the images a job reads: local files and folders, S3 prefixes
    notebook     the Python API (``inference.classify``, ``inference.accuracy_report``)

Imports ``inference.records``, ``inference.settings``, ``inference.errors`` and, of the worker
side, only ``inference.worker.plugin`` (the plugin it registers and the task it submits, both
importable without torch). Never torch, torchvision or Pillow: a stream worker imports this.
"""
