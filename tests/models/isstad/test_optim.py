"""The fused AdamW takes the same steps as torch's reference single-tensor loop, with ISSTAD's parameter groups."""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay

from isstad_plugin.models.isstad.optim import adamw
from isstad_plugin.models.isstad.torch_model import IsstadModel


def test_fused_adamw_matches_the_single_tensor_loop() -> None:
    torch.manual_seed(0)
    reference = IsstadModel(backbone="vit_tiny", image_size=(32, 32), decoder_embed_dim=32, decoder_depth=2,
                            decoder_num_heads=4)
    fast = IsstadModel(backbone="vit_tiny", image_size=(32, 32), decoder_embed_dim=32, decoder_depth=2,
                       decoder_num_heads=4)
    fast.load_state_dict(reference.state_dict())
    initial = {name: value.detach().clone() for name, value in reference.named_parameters()}
    options = {"lr": 1e-3, "betas": (0.9, 0.95)}
    slow_opt = torch.optim.AdamW(param_groups_weight_decay(reference, 0.05), foreach=False, fused=False, **options)
    fast_opt = adamw(param_groups_weight_decay(fast, 0.05), torch.device("cpu"), **options)
    assert fast_opt.defaults["fused"] is True
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    steps = 5
    for _ in range(steps):
        for model, optimizer in ((reference, slow_opt), (fast, fast_opt)):
            optimizer.zero_grad()
            output = model(images, mask_ratio=0.0)
            (output.reconstruction.square().mean() + output.block_logits.square().mean()).backward()
            optimizer.step()
    unmoved = set()
    for (name, expected), actual in zip(reference.named_parameters(), fast.parameters(), strict=True):
        expected, actual, start = expected.detach(), actual.detach(), initial[name]
        if name.endswith("attn.qkv.bias"):
            # The key bias gets a zero gradient up to rounding (softmax ignores it); Adam turns that noise into
            # full-size steps that two implementations round differently. Compare its thirds separately.
            width = len(expected) // 3
            key = slice(width, 2 * width)
            bound = options["lr"] * steps  # Adam moves a parameter by at most ~lr per step
            assert (actual[key] - expected[key]).abs().max() <= 0.1 * bound, name
            keep = torch.ones_like(expected, dtype=torch.bool)
            keep[key] = False
            expected, actual, start = expected[keep], actual[keep], start[keep]
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)
        if torch.equal(expected, start):
            unmoved.add(name)
    assert unmoved == {"mask_token"}  # only the unused mask token stood still: the weights did train
