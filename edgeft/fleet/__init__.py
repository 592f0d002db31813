"""Fleet learning on Flower: devices train the bundle's adapter on their own rows with ONNX Runtime,
the server aggregates the adapters. Torch-free.

  aggregate.py  sample-weighted aggregation of LoRA adapters (exact: mean of B·A re-factored by SVD; fedavg)
  validate.py   the checks on every update (base, round, names, shapes, NaN/inf, sha256, samples)
  local.py      one round on a device: the server's adapter in, device train's trainer, the adapter out
  client.py     the Flower ClientApp around local.py
  server.py     the Flower ServerApp: FedAvg's loop and sampling, edgeft's checks, aggregation, evaluation
  outputs.py    what the server writes per round: log, update folder, PEFT adapter
  launch.py     Flower's processes (SuperLink, SuperNode, `flwr run`) and its configuration files
  serve.py      `edgeft fleet serve` / `edgeft device fleet-join`: checks, then the processes
  cli.py        the commands
"""
