"""`mllm-edge plan`: what a model costs on a device before anything is downloaded or built.

costs.py     bytes and FLOPs of each part, counted from the architecture (a bundle's manifest or a
             checkpoint's config.json), per precision and pruning setting
devices.py   NVIDIA's published memory, bandwidth and throughput of Jetsons and desktop GPUs, and
             this machine's measured ones (`cpu`)
predict.py   memory against what the device gives a process, and times from a roofline with the
             efficiency factors fitted to published measurements (efficiency.json, made by
             benchmarks/plan_fit.py)
"""
