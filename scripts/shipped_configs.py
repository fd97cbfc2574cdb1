"""Write lavae_fast/configs/NAME.yaml, the settings that trained each shipped model, from the
settings recorded in its file (``args``), resolved as ``--resume`` resolves them (a setting added
after the run gets the value the run used, not today's default) and without what belongs to one
machine or one invocation (the output folder, the device, threads, progress bars).

    python scripts/shipped_configs.py     # rewrites every file; tests/test_config_files.py checks them
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lavae_fast.checkpoint import load_checkpoint  # noqa: E402
from lavae_fast.pretrained import REGISTRY, model_file, shipped  # noqa: E402
from lavae_fast.train import build_parser  # noqa: E402
from lavae_fast.train_config import CONFIG_DIR, config_file_text, resolved_settings  # noqa: E402


def main() -> None:
    os.makedirs(CONFIG_DIR, exist_ok=True)
    dests = {a.dest for a in build_parser()._actions if a.option_strings}
    for kind, name in sorted(shipped()):
        state = load_checkpoint(model_file(kind, name))
        values = resolved_settings(state["args"], dests)
        header = (f"The settings that trained the shipped {kind} model {name!r} ({REGISTRY[(kind, name)]}, step "
                  f"{int(state['step'])}), from the settings recorded in it.\n"
                  f"Train it again: python -m lavae_fast.train --config {kind}-{name} --out RUN_DIR\n"
                  "(options typed after --config override these lines). Written by scripts/shipped_configs.py.")
        path = os.path.join(CONFIG_DIR, f"{kind}-{name}.yaml")
        with open(path, "w") as f:
            f.write(config_file_text(values, header))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
