"""`python -m benchmarks`: our engine against transformers + peft on the same job.

One command runs the same fine-tuning job (model, rows, epochs, batch size, rank, targets, seed,
optimizer, schedule, clipping) several ways, each in a fresh subprocess so that peak memory
(RSS, or the CUDA peak on a GPU) belongs to that run alone. The runs load side by side and then
train in turns, one step each in round robin, so that only one computes at any moment and a
machine that gets busier during the bench slows them all alike; a run's train time is the sum
of its step times:

  ours       lora_studio.engine.run.train with its defaults (precision auto, length-grouped batches,
             LM head on trained positions only, chunked cross-entropy)
  peft-fp32  the usual stack: transformers model + peft's default LoRA layer, a plain PyTorch
             loop over padded batches, `model(**batch).loss`, everything fp32. By default it
             takes our batches in our order (length-grouped, seeded) and our adapter init, so
             that the two runs differ in the engine only and their losses can be compared
             step for step; `--baseline-order data` feeds consecutive rows in file order.
  peft-bf16  the same loop under bf16 autocast (what an expert runs)

Every run is scored the same way afterwards, in fp32: eval loss and token accuracy (argmax =
label, teacher forced) on the same held-out rows, with the saved adapter on the fp32 base for
ours and the peft model as it stands for the baseline. Output: a markdown table (stdout and
bench.md), bench.json, and bench_loss.png/.svg (train loss against wall time for every run).

`--methods` instead trains every method of the registry for the same steps and tabulates
time, peak memory, trainable parameters and loss.

The modules: `driver` (command line, the data split, the worker processes taking turns),
`variants` (what runs inside one worker: ours or the peft baseline, and the scoring), `report`
(ratios, targets, the markdown tables) and `plot` (the loss-against-time SVG and PNG).

This folder lives outside `lora_studio/` because it imports peft, which the runtime package
never does (`pip install -r requirements-dev.txt`, or `pip install peft`).
"""
