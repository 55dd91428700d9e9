"""Transformers must never replace "hf_flash" by another flash implementation.

5.x models that list ``_compatible_flash_implementations`` (gpt-oss, granite_swa, ...) swap any requested
name containing "flash" that is not in their list for its first entry, a Hub kernel; hf_flash answers for
its name there (``integrations.transformers._count_among_compatible_flash_implementations``). The models
are found by scanning Transformers' modeling modules, so one that a later release adds is checked too.
"""

import importlib
import logging
from pathlib import Path

import pytest
import torch
import transformers
from _tiny import make_config, make_model, tokens
from transformers import AttentionInterface, PreTrainedModel

from hf_flash.integrations import transformers as integration

ATTRIBUTE = "_compatible_flash_implementations"


def _modules_declaring_a_list() -> list[str]:
    """Transformers' modeling modules whose source declares ``_compatible_flash_implementations`` (a text
    scan: importing every modeling module would take minutes)."""
    root = Path(transformers.models.__file__).parent
    return [
        f"transformers.models.{path.parent.name}.{path.stem}"
        for path in sorted(root.glob("*/modeling_*.py"))
        if ATTRIBUTE in path.read_text(encoding="utf-8")
    ]


MODULES = _modules_declaring_a_list()


def _model_classes(module) -> list[type]:
    """The module's model classes whose (own or inherited) list is set."""
    return [
        obj for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, PreTrainedModel) and obj.__module__ == module.__name__
        and getattr(obj, ATTRIBUTE, None) is not None
    ]  # fmt: skip


def test_the_scan_finds_the_models_that_redirect():
    if not hasattr(PreTrainedModel, ATTRIBUTE):
        assert not MODULES
        pytest.skip(f"Transformers {transformers.__version__} has no {ATTRIBUTE} (no redirect)")
    assert "transformers.models.gpt_oss.modeling_gpt_oss" in MODULES, MODULES


@pytest.mark.parametrize("module_name", MODULES, ids=[name.rsplit(".", 2)[1] for name in MODULES])
def test_no_model_class_replaces_hf_flash(module_name):
    """Every model class of the module keeps "hf_flash" (and its paged form), at init and when set later.

    The check runs on instances made without ``__init__``: the redirect lives in
    ``_check_and_adjust_attn_implementation``, which reads the class and the name only; building each
    model would need a working tiny config per architecture. gpt-oss is also loaded for real below.
    """
    classes = _model_classes(importlib.import_module(module_name))
    assert classes, f"{module_name} mentions {ATTRIBUTE} but no model class sets it"
    for cls in classes:
        model = cls.__new__(cls)
        torch.nn.Module.__init__(model)
        for is_init_check in (True, False):
            got = model._check_and_adjust_attn_implementation("hf_flash", is_init_check=is_init_check)
            assert got == "hf_flash", f"{cls.__name__} replaced hf_flash by {got}"
        assert ATTRIBUTE not in model.__dict__, "the list shadowed for the call was left on the instance"
        # other names are left to Transformers (the redirect still applies to them)
        assert model._check_and_adjust_attn_implementation("eager") == "eager"


@pytest.fixture(scope="module")
def saved_gpt_oss(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt-oss")
    make_model("gpt_oss", "eager", dtype=torch.float32).save_pretrained(path)
    return path


def _attention_calls(model, monkeypatch) -> int:
    """How many attention calls of one forward pass reach hf_flash's attention function."""
    seen = []
    original = AttentionInterface._global_mapping["hf_flash"]
    spy = lambda *args, **kwargs: seen.append(1) or original(*args, **kwargs)
    monkeypatch.setitem(AttentionInterface._global_mapping, "hf_flash", spy)
    with torch.no_grad():
        model(tokens(1, 6))
    return len(seen)


def test_gpt_oss_loads_and_switches_to_hf_flash(saved_gpt_oss, monkeypatch, caplog):
    """The bug users hit on 5.25: from_pretrained(attn_implementation="hf_flash") logged "Automatically
    falling back to `kernels-community/vllm-flash-attn3` instead of `hf_flash`" and then failed offline."""
    cls = transformers.GptOssForCausalLM
    with caplog.at_level(logging.WARNING, logger="transformers"):
        loaded = cls.from_pretrained(saved_gpt_oss, attn_implementation="hf_flash").eval()
        switched = cls.from_pretrained(saved_gpt_oss, attn_implementation="eager").eval()
        switched.set_attn_implementation("hf_flash")
        built = cls._from_config(make_config("gpt_oss"), attn_implementation="hf_flash").eval()
    assert "falling back" not in caplog.text, caplog.text
    layers = make_config("gpt_oss").num_hidden_layers
    for model in (loaded, switched, built):
        assert model.config._attn_implementation == "hf_flash"
        assert model.model.config._attn_implementation == "hf_flash"
        assert _attention_calls(model.to(tokens(1, 1).device, torch.float16), monkeypatch) == layers
    assert getattr(cls, ATTRIBUTE, None) is None or integration.NAME not in getattr(cls, ATTRIBUTE)
