"""condgen.bench: throughput and latency benchmarks, all side by side in one process run.

`python -m condgen.bench` (or `condgen bench`, `make bench`) measures our engine against
transformers and optimum on the same checkpoint and prompts, the gRPC server under 1, 16
and 64 concurrent streams against the same load in process, and continuous against static
batching; it prints a table and writes JSON to bench/results/latest.json.
"""
