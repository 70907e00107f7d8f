"""The whole post-training pipeline on one verifiable task, on a CPU: SFT -> reward model -> DPO -> GRPO.

    python experiments/quickstart.py                      # the same as `polmjax quickstart`
    python experiments/quickstart.py --out runs/qs --set grpo.train.steps=120

See `polmjax/quickstart.py` for the stages; each stage is an ordinary run directory under --out.
"""

import sys

from polmjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))
