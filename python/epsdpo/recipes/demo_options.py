"""What `epsdpo demo` trains with: its options and the settings it fixes.

Kept apart from the recipe (which imports torch and the models) so that `epsdpo demo --help` can show
every default without loading them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoOptions:
    output_dir: str = "outputs/demo"
    max_steps: int = 24
    batch_size: int = 4
    learning_rate: float = 5e-6
    beta: float = 0.1
    epsilon: float = 0.05
    layout: str = "packed"
    eval_prompts: int = 48
    max_new_tokens: int = 48
    threads: int | None = None
    bf16: bool = False  # bf16 autocast over fp32 master weights, as on a GPU


# TrainConfig fields the demo sets and no option changes.
FIXED_SETTINGS = dict(lr_scheduler_type="cosine", warmup_ratio=0.1, max_length=512, max_prompt_length=384, seed=0)
