"""Run by tests/test_fsdp.py under torchrun (2 CPU ranks, gloo): lora_studio.engine.fsdp against a
plain single-process copy of the same tiny model, for several methods in one launch.

Each rank trains a sharded copy on its half of a batch and the reference (built alike in this
process, not sharded) on the whole batch; the losses, the gathered adapter and a sharded
checkpoint's round trip are compared. Prints `OK <method>` per method; asserts otherwise.
`<method>:bf16` gathers and computes in bf16 (MixedPrecisionPolicy) against the fp32 reference,
within bf16's tolerance. On GPUs (`cuda` as the first argument after the folder): NCCL."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lora_studio.engine import fsdp
from lora_studio.methods import adapter_layers, get_method, inject_adapters, trainable_parameters


class Loss(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # summed next-token loss
        logits = self.model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")


def tiny(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.3)
    return LlamaForCausalLM(cfg)


def check(spec: str, rank: int, world: int, ckpt_root: Path, device: torch.device) -> None:
    method_name, _, mode = spec.partition(":")
    mp = torch.bfloat16 if mode == "bf16" else None
    tol = dict(rtol=1e-3, atol=1e-5)
    method = get_method(method_name)
    cfg = SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, lr=1e-2, lr_ratio=1.0, target="all-linear", use_rslora=False,
                          method_options={}, quantize=None, weight_decay=0.0)
    cfg.method_options = {k: method.option(cfg, k) for k in method.option_names}
    base = tiny()
    torch.manual_seed(1)
    inject_adapters(base, method, cfg)
    with torch.no_grad():  # B starts at zero: move it so the first gradients reach A too
        for layer in adapter_layers(base).values():
            for name, p in layer.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    ref = Loss(copy.deepcopy(base)).to(device)
    sharded = Loss(base)
    total_before = sum(p.numel() for p in base.parameters())
    fsdp.shard_model(sharded, fsdp.decoder_layers(base), mp)
    seen: list[torch.dtype] = []  # the dtype a layer computes in: after FSDP's own pre-forward gather
    first = fsdp.decoder_layers(base)[0]
    first.register_forward_pre_hook(lambda m, args: seen.append(next(p for p in m.parameters() if p.requires_grad).dtype))
    local = sum(p.to_local().numel() for p in base.parameters())
    assert local <= total_before // world + 200, (local, total_before)  # 1/N of the weights, base included
    opt_ref = torch.optim.AdamW(trainable_parameters(ref).values(), lr=1e-2)
    opt = torch.optim.AdamW(trainable_parameters(sharded).values(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        ids = torch.randint(0, 64, (4, 12), generator=g).to(device)  # the global batch
        n = ids[:, 1:].numel()
        loss_ref = ref(ids)
        (loss_ref / n).backward()
        mine = ids[rank::world]
        loss = sharded(mine)
        (loss * world / n).backward()  # the reduce-scatter averages over ranks: make it the sum
        total = loss.detach().clone()
        dist.all_reduce(total)
        close = torch.allclose(total, loss_ref.detach(), rtol=2e-2 if mp else 2e-4)
        assert close, (spec, step, float(total), float(loss_ref))
        norm_ref = torch.nn.utils.clip_grad_norm_(list(trainable_parameters(ref).values()), 1.0)
        norm = fsdp.full_norm(torch.nn.utils.clip_grad_norm_(list(trainable_parameters(sharded).values()), 1.0))
        assert torch.allclose(norm, norm_ref, rtol=5e-2 if mp else 1e-4), (spec, float(norm), float(norm_ref))
        assert seen[-1] == (mp or torch.float32), seen
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
    with fsdp.gathered_trainable(sharded):
        got = {k: v.detach().clone() for k, v in trainable_parameters(sharded).items()}
        assert not any(fsdp.is_sharded(v) for v in got.values())
    assert all(fsdp.is_sharded(p) for p in trainable_parameters(sharded).values())  # put back
    want = trainable_parameters(ref)
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].dtype == torch.float32  # the sharded (kept) copy stays fp32 under bf16 compute
        if mp is None:
            torch.testing.assert_close(got[k], want[k].detach(), **tol)
    if mp is not None:  # Adam's sign-like steps flip on tiny bf16 gradients: compare the whole adapter
        g_all = torch.cat([v.flatten() for v in got.values()])
        w_all = torch.cat([want[k].detach().flatten() for k in got])
        assert (g_all - w_all).norm() <= 0.05 * w_all.norm(), float((g_all - w_all).norm() / w_all.norm())

    # checkpoint round trip: save, train one more step, load, and the first state is back
    folder = ckpt_root / spec.replace(":", "-")
    fsdp.save_sharded_checkpoint(sharded, opt, folder)
    assert fsdp.has_sharded_checkpoint(folder)
    assert len(list(folder.glob("*.distcp"))) == world
    ids = torch.randint(0, 64, (4, 12), generator=g).to(device)
    sharded(ids[rank::world]).backward()
    opt.step(), opt.zero_grad()
    fsdp.load_sharded_checkpoint(sharded, opt, folder)
    with fsdp.gathered_trainable(sharded):
        back = {k: v.detach().clone() for k, v in trainable_parameters(sharded).items()}
    for k in got:
        torch.testing.assert_close(back[k], got[k], rtol=0, atol=0)
    if spec == "lora":  # NaN in one rank's shard: no rank writes a checkpoint, both say why
        victim = next(iter(trainable_parameters(sharded).values()))
        saved = victim.detach().to_local().clone()
        if rank == world - 1:
            with torch.no_grad():
                victim.to_local()[0] = float("nan")
        try:
            fsdp.save_sharded_checkpoint(sharded, opt, ckpt_root / "nan")
            raise AssertionError("a NaN shard was written")
        except ValueError as e:
            assert "NaN or inf" in str(e), e
        assert not (ckpt_root / "nan").exists() or not any((ckpt_root / "nan").iterdir())
        with torch.no_grad():
            victim.to_local().copy_(saved)
    print(f"OK {spec} rank{rank}", flush=True)


def main() -> None:
    args = sys.argv[2:]
    cuda = bool(args) and args[0] == "cuda"
    if cuda:
        args = args[1:]
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    root = Path(sys.argv[1])
    for spec in args:
        check(spec, rank, world, root, device)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
