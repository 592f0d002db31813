"""The base model is recorded by name and fingerprint, never by a workstation path; bundles and
adapters travel, and a wrong base folder is refused by name."""

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import device, run, write_jsonl

ROWS = [{"text": t, "label": y} for t, y in [("i loved it", "pos"), ("great result", "pos"), ("sad movie", "neg"), ("terrible day", "neg")] * 4]


def copy_bundle(src: Path, dst: Path) -> Path:
    """The session's bundle is shared: work on a copy, without any device state it may hold."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("state"))
    return dst


def json_strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_strings(k)
            yield from json_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_strings(v)


def assert_no_paths(folder: Path, roots: list[str], skip=()) -> int:
    checked = 0
    for f in sorted(folder.rglob("*.json")):
        if f.name in skip:
            continue
        vocabulary = f.name == "tokenizer.json"  # its token strings ("/", "/s") are not paths
        for s in json_strings(json.loads(f.read_text(encoding="utf-8"))):
            assert (vocabulary or not s.startswith("/")) and not any(r in s for r in roots), f"{f.relative_to(folder)}: {s!r}"
        checked += 1
    return checked


def test_no_absolute_path_in_a_run_a_bundle_or_a_device_adapter(tmp_path, tmp_path_factory, cls_run, cls_bundle):
    roots = [str(tmp_path_factory.getbasetemp()), str(Path(tmp_path_factory.getbasetemp()).resolve()), str(tmp_path), str(Path.home())]
    # summary.json records what `train --json` printed: the paths exactly as the user typed them
    assert assert_no_paths(cls_run, roots, skip=("summary.json",)) >= 4  # config, adapter_config, edgeft.json, tokenizer, checkpoint
    bundle = copy_bundle(cls_bundle, tmp_path / "b")
    assert assert_no_paths(bundle, roots) >= 3
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 3 and "source" not in manifest["target"] and manifest["target"]["name"]
    assert manifest["base"]["name"] == "tiny-bert" and manifest["base"]["fingerprint"].startswith("sha256:")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    r, _ = device("train", "--bundle", bundle, "--data", data, "--max-steps", 2, "--quiet")
    assert r.exit_code == 0, r.output
    r, _ = device("export-adapter", "--bundle", bundle, "--out", tmp_path / "gen1")
    assert r.exit_code == 0, r.output
    assert assert_no_paths(tmp_path / "gen1", roots) >= 2
    meta = json.loads((tmp_path / "gen1" / "edgeft.json").read_text())
    assert meta["base"] == manifest["base"]  # the workstation checks an adapter coming back against it
    assert json.loads((tmp_path / "gen1" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-bert"


def test_a_moved_bundle_trains_from_another_directory_and_peft_loads_what_comes_back(tmp_path, cls_bundle, tiny_bert, monkeypatch):
    copy_bundle(cls_bundle, tmp_path / "usb" / "bundle")
    data = write_jsonl(tmp_path / "usb" / "new.jsonl", ROWS)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r, s = device("train", "--bundle", "../usb/bundle", "--data", "../usb/new.jsonl", "--max-steps", 3, "--lr", "5e-3", "--tolerance", "1",
                  "--json", "--quiet")
    assert r.exit_code == 0 and s["generation"] == 1, r.output
    r, _ = device("export-adapter", "--bundle", "../usb/bundle", "--generation", "1", "--out", "gen1")
    assert r.exit_code == 0 and (tmp_path / "elsewhere" / "gen1" / "adapter_model.safetensors").is_file(), r.output
    assert data.is_file()

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)  # the base folder, given explicitly
    model = PeftModel.from_pretrained(base, "gen1")
    saved = load_file("gen1/adapter_model.safetensors")
    params = {n.replace(".default", ""): p for n, p in model.named_parameters()}
    key = next(k for k in saved if "lora_B" in k)
    assert torch.equal(saved[key], params[key])  # the device's weights, not the bundle's


def test_the_base_folder_is_found_and_checked(tmp_path, cls_run, tiny_bert, tiny_llama):
    from edgeft.basemodel import fingerprint, identify
    from edgeft.errors import ModelError
    from edgeft.workstation.adapters import read_adapter_meta, resolve_base

    meta = read_adapter_meta(cls_run)
    assert meta["base"]["fingerprint"] == fingerprint(tiny_bert) and meta["base"]["name"] == "tiny-bert"
    assert not os.path.isabs(meta["base"]["path_hint"])
    found, base = resolve_base(meta)  # from the run's config.json
    assert Path(found).resolve() == Path(tiny_bert).resolve() and base == identify(tiny_bert)
    with pytest.raises(ModelError, match=r"tiny-llama .* but the adapter .* base tiny-bert") as e:
        resolve_base(meta, tiny_llama)  # --model wins, and must be the right base
    assert "--model" in e.value.hint

    # a run folder moved beside the fixture's (same depth): the adapter's path hint still finds the base
    moved = tmp_path / "run"
    shutil.copytree(cls_run, moved)
    (moved / "config.json").unlink()
    assert Path(resolve_base(read_adapter_meta(moved))[0]).resolve() == Path(tiny_bert).resolve()
    # the adapter alone, somewhere else: no way to the base but --model
    lone = tmp_path / "x" / "y" / "adapter"
    shutil.copytree(cls_run / "adapter", lone)
    with pytest.raises(ModelError, match="cannot find the base model .* tiny-bert"):
        resolve_base(read_adapter_meta(lone))
    assert resolve_base(read_adapter_meta(lone), tiny_bert)[1] == identify(tiny_bert)
    # an older edgeft's edgeft.json (the base by absolute path) still resolves
    legacy = json.loads((lone / "edgeft.json").read_text())
    legacy.pop("base")
    legacy["base_model"] = str(tiny_bert)
    (lone / "edgeft.json").write_text(json.dumps(legacy))
    assert resolve_base(read_adapter_meta(lone))[0] == Path(tiny_bert)
    # a base whose weights changed is not the same base
    changed = tmp_path / "tiny-bert"
    shutil.copytree(tiny_bert, changed)
    (changed / "config.json").write_text((changed / "config.json").read_text().replace("{", '{"edited": true,', 1))
    assert fingerprint(changed) != fingerprint(tiny_bert)
    with pytest.raises(ModelError, match="was made for base tiny-bert"):
        resolve_base(read_adapter_meta(cls_run), changed)


def test_commands_refuse_the_wrong_base_with_exit_4(tmp_path, cls_run, tiny_llama, tiny_bert):
    from conftest import target

    r = run("export", "--run", cls_run, "--model", tiny_llama, "--target", target(tmp_path), "--out", tmp_path / "b")
    assert r.exit_code == 4 and "tiny-llama" in r.output and "tiny-bert" in r.output and "--model" in r.output, r.output
    assert not (tmp_path / "b").exists()
    lone = tmp_path / "far" / "away" / "adapter"
    shutil.copytree(cls_run / "adapter", lone)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    r = run("eval", "--adapter", lone, "--data", data)
    assert r.exit_code == 4 and "cannot find the base model" in r.output and "--model" in r.output, r.output
    r = run("eval", "--adapter", lone, "--data", data, "--model", tiny_bert, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"] == len(ROWS), r.output
    r = run("plan", "--adapter", lone, "--model", tiny_llama, "--target", target(tmp_path), "--json")
    assert r.exit_code == 4, r.output


def test_manifest_is_typed_and_the_schema_is_checked(tmp_path, cls_bundle):
    from edgeft.bundle import SCHEMA_VERSION, Manifest, read_manifest, verify_bundle

    m = verify_bundle(cls_bundle)
    assert isinstance(m, Manifest) and m.task == "classify" and m.labels == ["neg", "pos"] and m.train_shape.batch == 2
    assert m.base.name == "tiny-bert" and m.target_name and m.portable["train_step"] and m.trainable
    raw = json.loads((cls_bundle / "manifest.json").read_text())
    assert json.loads(m.to_json()) == raw  # nothing lost on a round trip
    assert Manifest.read(cls_bundle) == read_manifest(cls_bundle) == m
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({**raw, "schema_version": 1}))
    r, _ = device("verify", "--bundle", old)
    assert r.exit_code == 8 and f"schema version 1 is not {SCHEMA_VERSION}" in r.output and "re-export" in r.output


def test_fingerprint_covers_config_and_weights_and_is_cached(tmp_path, tiny_bert):
    import time

    from edgeft.basemodel import fingerprint

    copy = tmp_path / "m"
    shutil.copytree(tiny_bert, copy)
    first = fingerprint(copy)
    assert first == fingerprint(tiny_bert) and first.startswith("sha256:")
    t0 = time.perf_counter()
    assert fingerprint(copy) == first and time.perf_counter() - t0 < 0.05  # cached
    (copy / "tokenizer.json").write_text("{}")  # not part of the base's identity
    assert fingerprint(copy) == first
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert fingerprint(copy) != first
