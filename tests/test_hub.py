"""Tests for diffo.hub: resolving model sources and the per-process model cache. No network: Hub repo ids are
served from a Hugging Face cache that the tests build by hand, in offline mode."""

import hashlib
import json
import os
import shutil
import threading

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors import safe_open

from diffo import hub
from diffo.models.diffo.codec import CONFIG_NAME, WEIGHTS_NAME, DiffoCodec
from diffo.errors import DiffoError, ModelLoadError
from diffo.hub import cached_models, clear_cache, load_model, resolve_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "someone/diffo-test"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model, finalised and saved; (model, folder)."""
    torch.manual_seed(0)
    m = DiffoCodec.from_preset("tiny")
    m.update()
    folder = m.save_pretrained(tmp_path_factory.mktemp("hub") / "model", model_card="# test")
    return m, folder


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, saved):
    """An offline Hugging Face cache under tmp_path holding REPO at COMMIT (refs/main -> COMMIT)."""
    _, folder = saved
    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        try:
            os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / f.name)
        except OSError:  # no symlinks (Windows without developer mode): plain copies, as huggingface_hub does
            shutil.copyfile(blob, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # no newline: huggingface_hub reads the file verbatim
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import: patch the constants too, so that nothing can go online
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return snap


# ---------------------------------------------------------------------------------------------- local folders
def test_local_folder_loads(saved):
    m, folder = saved
    model = load_model(folder)
    assert isinstance(model, DiffoCodec)
    assert model.fingerprint == m.fingerprint
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.vae.dtype == torch.float32
    assert cached_models() == [(str(folder.resolve()), "cpu", torch.float32)]


def test_same_source_same_object(saved, monkeypatch):
    _, folder = saved
    a = load_model(folder)
    assert load_model(folder) is a
    assert load_model(str(folder)) is a
    assert load_model(str(folder) + os.sep) is a
    assert load_model(folder / ".") is a
    assert load_model(folder, device=torch.device("cpu"), dtype=torch.float32) is a
    monkeypatch.chdir(folder.parent)
    assert load_model("./" + folder.name) is a
    assert len(cached_models()) == 1


def test_other_dtype_other_object(saved):
    m, folder = saved
    a = load_model(folder)
    b = load_model(folder, dtype=torch.bfloat16)
    assert b is not a
    assert load_model(folder, dtype=torch.bfloat16) is b
    assert b.vae.dtype == torch.bfloat16 and b.denoiser.unet.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in b.latent_codec.parameters())
    assert all(t.dtype == torch.float32 for t in b.latent_codec.buffers() if t.is_floating_point())
    assert a.vae.dtype == torch.float32  # the float32 copy was not changed by loading the other
    assert b.fingerprint == a.fingerprint == m.fingerprint  # fingerprint names the stored weights
    assert len(cached_models()) == 2


def test_clear_cache(saved):
    _, folder = saved
    a = load_model(folder)
    clear_cache()
    assert cached_models() == []
    b = load_model(folder)
    assert b is not a
    assert b.fingerprint == a.fingerprint


def test_bad_dtype(saved):
    with pytest.raises(ValueError, match="dtype"):
        load_model(saved[1], dtype=torch.int8)


def test_log_line(saved, caplog):
    with caplog.at_level("INFO", logger="diffo.hub"):
        model = load_model(saved[1])
    text = caplog.text
    assert str(saved[1].resolve()) in text and model.fingerprint.hex() in text


def test_concurrent_callers_load_once(saved, monkeypatch):
    _, folder = saved
    loads = []
    real = DiffoCodec.from_dir.__func__

    def counting(cls, f):
        loads.append(f)
        return real(cls, f)

    monkeypatch.setattr(DiffoCodec, "from_dir", classmethod(counting))
    clear_cache()
    barrier = threading.Barrier(4)
    results, errors = [None] * 4, []

    def worker(i):
        try:
            barrier.wait()
            results[i] = load_model(folder)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert results[0] is not None and all(r is results[0] for r in results)
    assert len(loads) == 1


# --------------------------------------------------------------------------------------------- embedded model
def test_default_aliases_share_one_model(saved, monkeypatch):
    _, folder = saved
    monkeypatch.setattr(hub, "EMBEDDED_DIR", folder)
    a = load_model()
    for alias in (None, "", "default", "embedded", "diffo-tiny"):
        assert load_model(alias) is a
    assert load_model(folder) is a  # the embedded folder under its own path is the same model
    assert resolve_model_dir(None) == folder


def test_embedded_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "EMBEDDED_DIR", tmp_path / "weights" / "diffo-tiny")
    with pytest.raises(ModelLoadError, match="embedded model.*missing.*reinstall"):
        load_model()
    with pytest.raises(ModelLoadError, match="reinstall"):
        resolve_model_dir("default")


# --------------------------------------------------------------------------------------------------- errors
def test_missing_folder(tmp_path):
    for src in (tmp_path / "nope", str(tmp_path / "nope"), "./nope-nope", "~/definitely-not-a-diffo-model",
                "a/b/c"):
        with pytest.raises(ModelLoadError, match="not found"):
            resolve_model_dir(src)


def test_file_is_not_a_folder(saved):
    with pytest.raises(ModelLoadError, match="not found.*is a file"):
        resolve_model_dir(saved[1] / CONFIG_NAME)


def test_folder_without_config(saved, tmp_path):
    bad = tmp_path / "noconfig"
    bad.mkdir()
    shutil.copy(saved[1] / WEIGHTS_NAME, bad / WEIGHTS_NAME)
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(bad)
    assert cached_models() == []


def test_folder_with_pickle(saved, tmp_path):
    bad = tmp_path / "pickled"
    shutil.copytree(saved[1], bad)
    (bad / "model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(bad)


@pytest.mark.parametrize("change", ["shape", "not-a-dict", "bad-json"])
def test_folder_with_inconsistent_config(saved, tmp_path, change):
    bad = tmp_path / "inconsistent"
    shutil.copytree(saved[1], bad)
    cfg = json.loads((bad / CONFIG_NAME).read_text())
    if change == "shape":
        cfg["control_embedding_channels"] = 16
        text = json.dumps(cfg)
    else:
        text = "[1, 2]" if change == "not-a-dict" else "{not json"
    (bad / CONFIG_NAME).write_text(text)
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(bad)
    assert cached_models() == []


def test_invalid_repo_id():
    for src in ("a b c//", "a b c", "bad--name..", "x" * 200):
        with pytest.raises(ModelLoadError):
            resolve_model_dir(src)
    with pytest.raises(ModelLoadError, match="neither a local folder nor a valid Hub repo id"):
        resolve_model_dir("a b c")
    assert issubclass(ModelLoadError, DiffoError)


# ------------------------------------------------------------------------------------- Hub ids, offline cache
def test_hub_repo_from_offline_cache(saved, offline_cache):
    m, _ = saved
    model = load_model(REPO)
    assert model.fingerprint == m.fingerprint
    assert resolve_model_dir(REPO) == offline_cache.resolve()
    assert load_model(REPO, revision=COMMIT) is model  # the commit is the snapshot refs/main points at
    assert load_model(REPO, revision="main") is model
    assert load_model(offline_cache) is model  # ... and the snapshot folder itself
    assert cached_models() == [(str(offline_cache.resolve()), "cpu", torch.float32)]


def test_hub_env_read_at_call_time(saved, offline_cache, monkeypatch):
    """Only the environment says offline and where the cache is: the resolver must honour it."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(offline_cache.parent.parent / "elsewhere"))
    calls = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append(kwargs)
        assert kwargs.get("local_files_only") is True  # no network attempt at all
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert resolve_model_dir(REPO) == offline_cache.resolve()
    assert calls and calls[0]["allow_patterns"] == hub.MODEL_FILES
    assert os.path.samefile(calls[0]["cache_dir"], offline_cache.parent.parent.parent)

    # HF_HOME is honoured too (its hub/ subfolder)
    home = offline_cache.parent.parent.parent.parent / "hf-home"
    shutil.copytree(offline_cache.parent.parent.parent, home / "hub", symlinks=True)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert resolve_model_dir(REPO).is_relative_to(home.resolve())


def test_hub_repo_not_in_cache(offline_cache):
    with pytest.raises(ModelLoadError, match=r"(?s)not in the local Hugging Face cache.*HF_HUB_OFFLINE") as info:
        load_model("someone/not-there")
    assert "someone/not-there" in str(info.value)
    assert cached_models() == []


def test_hub_unknown_revision_offline(offline_cache):
    with pytest.raises(ModelLoadError, match="cache"):
        resolve_model_dir(REPO, revision="v9")
    with pytest.raises(ModelLoadError, match="cache"):
        resolve_model_dir(REPO, revision="f" * 40)


def _http_error(cls, message):
    """An instance of a huggingface_hub HTTP error class (they want a response object)."""
    for modname in ("httpx2", "httpx"):
        try:
            mod = __import__(modname)
            resp = mod.Response(404, request=mod.Request("GET", "https://huggingface.co/api/models/x/y"))
            return cls(message, response=resp)
        except Exception:
            continue
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


@pytest.mark.parametrize("name,pattern", [
    ("RepositoryNotFoundError", "not found"),
    ("GatedRepoError", "gated"),
    ("RevisionNotFoundError", "no revision 'v2'"),
])
def test_hub_http_errors_mapped(monkeypatch, name, pattern):
    cls = getattr(huggingface_hub.errors, name)

    def fail(*args, **kwargs):
        raise _http_error(cls, "boom")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ModelLoadError, match=pattern) as info:
        resolve_model_dir(REPO, revision="v2")
    assert REPO in str(info.value)
    assert isinstance(info.value.__cause__, cls)


@pytest.mark.parametrize("exc", [ConnectionError("network down"), TimeoutError("slow"), OSError("disk")])
def test_hub_other_errors_mapped(monkeypatch, exc):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ModelLoadError, match=REPO):
        resolve_model_dir(REPO)


def test_hub_allow_patterns_passed(monkeypatch, tmp_path):
    seen = {}

    def fake(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_model_dir("stabilityai/sd-turbo", "abc", allow_patterns=["vae/*"]) == tmp_path.resolve()
    assert seen["repo_id"] == "stabilityai/sd-turbo" and seen["revision"] == "abc"
    assert seen["allow_patterns"] == ["vae/*"]


# ----------------------------------------------------------------------------------------- save / push layout
def test_save_layout(saved):
    _, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])
    assert (folder / "README.md").read_text(encoding="utf-8") == "# test"
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert cfg["_class_name"] == "DiffoCodec" and cfg["name"] == "diffo-tiny"


def test_save_half_precision(saved, tmp_path):
    m, _ = saved
    folder = m.save_pretrained(tmp_path / "half", half_precision=True, model_card="# half")
    seen = set()
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if not t.is_floating_point():
                continue
            part = k.split(".")[0]
            seen.add(part)
            want = torch.float32 if part == "latent_codec" else torch.float16
            assert t.dtype == want, k
    assert {"vae", "denoiser", "latent_codec"} <= seen
    a = load_model(folder)
    assert a.vae.dtype == torch.float32  # half-stored weights load back as float32
    fp = a.fingerprint
    clear_cache()
    b = load_model(folder)
    assert b is not a and b.fingerprint == fp
    assert DiffoCodec.from_dir(folder).fingerprint == fp


def test_push_to_hub_uploads_three_files(saved, monkeypatch):
    m, _ = saved
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(p.name for p in os.scandir(folder_path))
        card = open(os.path.join(folder_path, "README.md"), encoding="utf-8").read()
        calls.append(("upload_folder", repo_id, files, card, kwargs))
        return "commit-url"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = m.push_to_hub("someone/diffo-up", model_card="# pushed", private=True, token="hf_fake")
    assert out == "commit-url"
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == "someone/diffo-up" and calls[0][2].get("private") is True
    _, repo_id, files, card, _ = calls[1]
    assert repo_id == "someone/diffo-up"
    assert files == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])
    assert card == "# pushed"


def test_invalid_repo_id_fresh_process():
    """The error mapping must not depend on huggingface_hub submodules someone else happened to import."""
    import subprocess
    import sys

    code = ("from diffo.hub import resolve_model_dir\n"
            "from diffo.errors import ModelLoadError\n"
            "try:\n    resolve_model_dir('a b c')\n"
            "except ModelLoadError as e:\n    print(e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert "neither a local folder nor a valid Hub repo id" in out.stdout, out.stderr


def test_comfyui_loader_node_reads_a_hub_repo_from_the_offline_cache(offline_cache, saved, plugin):
    model, _ = saved
    loader = plugin.NODE_CLASS_MAPPINGS["DiffOLoadModel"]
    hub_entry = loader.INPUT_TYPES()["required"]["model"][0][-1]
    by_branch = loader().load(hub_entry, f" {REPO} ", "", "cpu", "float32")[0]
    by_commit = loader().load(hub_entry, REPO, COMMIT, "cpu", "float32")[0]
    assert by_branch is by_commit and by_branch.fingerprint == model.fingerprint
    with pytest.raises(plugin.diffo.errors.ModelLoadError, match="someone/absent"):
        loader().load(hub_entry, "someone/absent", "", "cpu", "float32")


def test_half_precision_loading_keeps_the_latent_codec_bit_exact(tiny_model, tmp_path):
    """load_model(dtype=float16) casts the float networks only: a float16 round trip would round the exact
    layers' float32 weights (and the entropy medians), and the copy would code other symbols than the file's
    weights under the same fingerprint."""
    import torch

    from diffo import pipeline
    from diffo.hub import clear_cache, load_model

    folder = tiny_model.save_pretrained(tmp_path / "m")
    full = {k: v for k, v in tiny_model.latent_codec.state_dict().items()}
    assert any(v.is_floating_point() and not torch.equal(v.half().float(), v) for v in full.values())
    clear_cache()
    half = load_model(folder, dtype=torch.float16)
    assert half.vae.dtype == torch.float16
    for k, v in half.latent_codec.state_dict().items():
        assert v.dtype == full[k].dtype and torch.equal(v, full[k]), k
    data = pipeline.encode(tiny_model, torch.rand(3, 32, 48), rate=0.7)
    assert all(torch.equal(a, b) for a, b in zip(pipeline.decode_symbols(half, data),
                                                 pipeline.decode_symbols(tiny_model, data)) if a is not None)
    clear_cache()
