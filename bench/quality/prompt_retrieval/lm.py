"""Scoring a prompt's answer options with a local causal LM, as upstream's MetaICL ``direct`` method does.

Upstream (``evaluation/prompt_retrieval/MetaICL/metaicl/data.py`` and ``model.py``, ``MetaICLData(method="direct",
max_length=1024, max_length_per_example=256)``): demonstrations become ``input`` + ``"\\n" + output``, every one
after the first prefixed by ``"\\n\\n\\n"``; the test input is prefixed by ``"\\n\\n\\n"`` and cut to
``256 - 2 - longest option`` tokens; each option ``"\\n" + option`` follows the demonstrations and the input, the
context being cut from the left to fit 1024 tokens. An option's loss is the mean cross-entropy of its own tokens;
the prediction is the option with the lowest loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class CausalLMScorer:
    """A transformers causal-LM folder (any architecture ``AutoModelForCausalLM`` loads), on CPU unless told."""

    def __init__(self, path: str | Path, max_length: int = 1024, max_length_per_example: int = 256, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
        self.device = device
        self.max_length = max_length
        self.max_length_per_example = max_length_per_example

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def sequences(self, demos: list[tuple[str, str]], test_input: str, options: list[str]) -> list[tuple[list[int], list[int]]]:
        """Per option: (context ids, option ids), exactly as MetaICL tensorizes them."""
        context: list[int] = []
        for i, (inp, out) in enumerate(demos):
            if i > 0:
                inp = ("\n\n" if inp == "" else "\n\n\n") + inp
            context += self.ids(inp) + self.ids("\n" + out)
        option_ids = [self.ids("\n" + o) for o in options]
        query = self.ids(("\n\n" if test_input == "" else "\n\n\n") + test_input)
        room = self.max_length_per_example - 2 - max(len(o) for o in option_ids)
        if len(query) >= room:
            query = query[:room]
        out = []
        for opt in option_ids:
            ids = context + query
            if len(ids) + len(opt) > self.max_length:
                ids = ids[len(ids) + len(opt) - self.max_length :]
            out.append((ids, opt))
        return out

    def option_losses(self, demos: list[tuple[str, str]], test_input: str, options: list[str]) -> list[float]:
        """Mean cross-entropy of each option's tokens after the demonstrations and the test input."""
        torch = self.torch
        losses = []
        for ctx, opt in self.sequences(demos, test_input, options):
            ids = torch.tensor([ctx + opt], device=self.device)
            with torch.no_grad():
                logits = self.model(input_ids=ids).logits[0, :-1].float()
            targets = ids[0, 1:]
            per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            losses.append(float(per_token[len(ctx) - 1 :].mean()))
        return losses

    def predict(self, demos: list[tuple[str, str]], test_input: str, options: list[str]) -> tuple[str, list[float]]:
        """The option with the lowest loss (the first of equals, as upstream's sort), and all losses."""
        losses = self.option_losses(demos, test_input, options)
        return options[min(range(len(losses)), key=losses.__getitem__)], losses

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"model_type": cfg.model_type, "parameters": sum(p.numel() for p in self.model.parameters())}
