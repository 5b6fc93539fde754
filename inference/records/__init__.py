"""What both sides of the cluster share: plain records and the pure functions over them.

    objects      object identity (bucket, key, version, ETag), pinned URIs, S3 URI parts
    labels       ImageNet's class table and the ground truth read from a path
    results      the records a batch returns (prediction, failure, timings) and the failure
                 reasons both sides read
    evaluation   accuracy over records (top-1, top-5, per class, confusions)
    report       the Markdown accuracy report

Imports nothing of visionstream's but ``inference.errors``; no torch, no Dask, no Kafka:
importable from the stream worker, the caller's process and a Dask worker alike.
"""
