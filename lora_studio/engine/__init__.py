"""The training engine, one file per concern (docs/architecture.md has the map):

  plan.py        Plan: everything decided once per run (method, device, precision, micro-batch)
  loss.py        the causal-LM loss over trained positions
  dist.py        torchrun ranks, batch sharding, collectives (no-ops on one process)
  fsdp.py        FSDP2 sharding (strategy fsdp): shard, gather the adapter, DCP checkpoints, refusals
  optim.py       optimizer (the method's, else AdamW) and the linear schedule
  loop.py        Trainer: step, evaluate, fit, save_checkpoint, restore
  run.py         train(): the run folder's lifecycle, signals, errors; the one writer of status.json
  checkpoint.py  resumable checkpoints
  memory.py      the memory estimate before a run, and the measured peak during it
  speed.py       the CPU speed paths (prefix-tree batches, chunked LM head, bf16 rules)

Nothing is imported here, so `import lora_studio.engine.speed` stays light.
"""
