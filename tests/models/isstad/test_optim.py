"""The fused AdamW takes the same steps as torch's reference single-tensor loop, with ISSTAD's parameter groups."""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay

from isstad_plugin.models.isstad.optim import adamw, weight_decay_groups
from isstad_plugin.models.isstad.torch_model import IsstadModel


def test_fused_adamw_matches_the_single_tensor_loop() -> None:
    """Both optimisers get the same gradients at every step (computed once, on the reference weights), so any
    difference is the update arithmetic itself."""
    torch.manual_seed(0)
    model = IsstadModel(backbone="vit_tiny", image_size=(32, 32), decoder_embed_dim=32, decoder_depth=2,
                        decoder_num_heads=4)
    reference = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    fast = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}

    def groups(params: dict[str, torch.Tensor]) -> list[dict]:  # ISSTAD's groups, on these tensors
        by_id = {id(p): name for name, p in model.named_parameters()}
        return [{**g, "params": [params[by_id[id(p)]] for p in g["params"]]}
                for g in param_groups_weight_decay(model, 0.05)]

    options = {"lr": 1e-3, "betas": (0.9, 0.95)}
    slow_opt = torch.optim.AdamW(groups(reference), foreach=False, fused=False, **options)
    fast_opt = adamw(groups(fast), torch.device("cpu"), **options)
    assert fast_opt.defaults["fused"] is True
    assert adamw(groups(fast), torch.device("cpu"), fused=False, **options).defaults["foreach"] is True
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(reference[name])
        model.zero_grad()
        output = model(images, mask_ratio=0.0)
        (output.reconstruction.square().mean() + output.block_logits.square().mean()).backward()
        for name, p in model.named_parameters():  # no gradient (the unused mask token): skipped by both
            reference[name].grad = None if p.grad is None else p.grad.clone()
            fast[name].grad = None if p.grad is None else p.grad.clone()
        slow_opt.step()
        fast_opt.step()
    unmoved = set()
    for name, expected in reference.items():
        torch.testing.assert_close(fast[name], expected, rtol=1e-5, atol=1e-7, msg=name)
        if torch.equal(expected, initial[name]):
            unmoved.add(name)
    assert unmoved == {"mask_token"}  # only the unused mask token stood still: the weights did train


def test_weight_decay_groups_split_like_timm() -> None:
    """Our groups (needed for a per-subset learning rate) apply timm's decay rule to exactly the same tensors."""
    model = IsstadModel("vit_tiny", image_size=(32, 32), decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    model.freeze_encoder(True, trainable_blocks=2)
    ours = weight_decay_groups(model, 0.05, lambda _: True)
    timm = param_groups_weight_decay(model, 0.05)
    assert [g["weight_decay"] for g in ours] == [g["weight_decay"] for g in timm]
    for a, b in zip(ours, timm, strict=True):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
