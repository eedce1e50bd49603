"""sptun's benchmarks: `scripts/bench` runs `python -m bench.run`.

Each module measures one part (data plane, control plane, faults) in labs of its own
(network namespaces under unique prefixes, always torn down); `report` writes
RESULTS.md and the plots. Nothing here is imported by sptun itself.
"""
