"""merge_lora: a peft adapter merged into plain weights gives the adapted module's outputs, for Linear layers
and for Conv2d ones (1x1, as a UNet's proj_in / proj_out, and 3x3): W + scale B A in W's shape."""
import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from pipeline.model_folder import merge_lora


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Conv2d(6, 8, 1)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.to_q = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.conv(self.proj_in(x))
        return self.to_q(h.permute(0, 2, 3, 1))


@pytest.mark.parametrize("alpha", [4, 8])
def test_merged_weights_give_the_adapted_outputs(alpha):
    torch.manual_seed(0)
    plain = Net()
    base = {k: v.clone() for k, v in plain.state_dict().items()}
    adapted = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=alpha, target_modules=["proj_in", "conv", "to_q"]),
                                      copy.deepcopy(plain))
    with torch.no_grad():  # B starts at 0 (no change): give every adapter a non-zero delta
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    x = torch.randn(2, 6, 5, 5)
    want = adapted(x)
    merged = merge_lora(adapted.state_dict(), alpha / 4)
    assert merged.keys() == base.keys()
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)
    # an adapter-only checkpoint (what a LoRA run saves) merges over the base weights to the same model
    only = {k: v for k, v in adapted.state_dict().items() if ".lora_" in k}
    again = Net()
    again.load_state_dict(merge_lora(only, alpha / 4, base))
    torch.testing.assert_close(again(x), want, rtol=1e-5, atol=1e-5)
