"""The ``xmodal`` dispatcher: its help lists every verb and sub-verb, and it imports nothing heavy."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from xmodal.commands.main import LIGHTNING_VERBS, SYNOPSES, VERBS, help_text, main


def sub_verbs(verb: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The sub-verbs a verb's own parser accepts (``{make,convert}`` in its usage line), or none."""
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    choices = re.search(r"\{([\w,-]+)\}", usage)
    return choices.group(1).split(",") if choices else []


@pytest.mark.parametrize("verb", ["data", "convert", "eval"])
def test_help_lists_every_sub_verb(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    subs = sub_verbs(verb, capsys)
    assert subs
    listed = [entry.split()[:2] for entry in SYNOPSES]
    assert all([verb, sub] in listed for sub in subs), (subs, listed)


def test_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    text = capsys.readouterr().out
    assert text == help_text() + "\n"
    for verb in [*VERBS, *LIGHTNING_VERBS]:
        assert re.search(rf"^  {re.escape(verb)}\b", text, flags=re.M), verb
    assert "eval bev" in text


def test_the_dispatcher_imports_neither_torch_nor_lightning() -> None:
    code = ("import sys, xmodal.commands.main as m; m.main(['--help']); "
            "print(sorted(n for n in ('torch', 'lightning', 'numpy') if n in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_asr_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is not installed
    with pytest.raises(SystemExit, match=r"matplotlib.*pip install 'xmodal\[plots\]'") as exit_info:
        main(["eval", "asr", "--config", str(tmp_path / "recipe.yaml"), "--list", str(tmp_path / "test.txt"),
              "--plot", str(tmp_path / "plots")])
    assert "\n" not in str(exit_info.value.code)


def test_fit_help_lists_only_plugin_classes_for_the_student(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    start = text.index("\n  --model.student STUDENT")
    block = text[start:text.index("\n  --", start + 1)]
    listed = re.findall(r"\b[a-z_]+(?:\.[a-z_0-9]+)+\.[A-Z]\w*", block.split("known subclasses:")[1])
    assert "xmodal.students.clip.CLIPStudent" in listed and "xmodal.teachers.open_clip.OpenCLIPTeacher" in listed
    assert all(path.startswith(("xmodal.modalities.", "xmodal.students.", "xmodal.teachers.")) for path in listed)



# `cache --help` is left out: jsonargparse builds it from cache_teacher's signature, whose types are torch's.
HELP_VERBS = ["data", "data make", "data convert", "stats", "compress", "search-student", "class-vectors", "convert",
              "convert whisper-ct2", "eval", "demo", "tune"]
HEAVY = ("torch", "lightning", "transformers", "open_clip")


def heavy_imports_of_help(verbs: list[str]) -> dict[str, list[str]]:
    """``xmodal VERB --help`` for each verb in turn, in one fresh interpreter: the heavy packages loaded after each."""
    code = ("import json, sys\nfrom xmodal.commands.main import main\nloaded = {}\n"
            "for verb in sys.argv[1:]:\n"
            "    try:\n        main([*verb.split(), '--help'])\n    except SystemExit:\n        pass\n"
            f"    loaded[verb] = [name for name in {HEAVY!r} if name in sys.modules]\n"
            "print(json.dumps(loaded))")
    result = subprocess.run([sys.executable, "-c", code, *verbs], capture_output=True, text=True, check=True)
    assert result.stdout.count("usage:") == len(verbs), result.stdout  # every verb printed its help
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_verb_help_imports_no_torch() -> None:
    from xmodal.data.convert.registry import converters

    eval_tasks = [" ".join(entry.split()[:2]) for entry in SYNOPSES if entry.startswith("eval ")]
    formats = [f"data convert {name}" for name in converters()]
    verbs = [*HELP_VERBS, *eval_tasks, *formats]
    assert len(eval_tasks) == 5 and len(formats) >= 10
    loaded = heavy_imports_of_help(verbs)
    assert loaded == {verb: [] for verb in verbs}


def test_help_texts_read_unimported_match_the_modules() -> None:
    import xmodal.search
    from xmodal.data import corpora
    from xmodal.data.convert import avspeech as convert_avspeech
    from xmodal.data.corpora import avspeech as corpus_avspeech
    from xmodal.modalities import bev_nets
    from xmodal.sources import module_constant, module_dict_keys, module_docstring

    assert module_docstring("xmodal.search") == xmodal.search.__doc__
    assert module_constant("xmodal.search", "CANDIDATES_FORMAT") == xmodal.search.CANDIDATES_FORMAT
    assert module_constant("xmodal.modalities.bev_nets", "DEFAULT_CLASSES") == bev_nets.DEFAULT_CLASSES
    assert module_dict_keys("xmodal.data.corpora", "CORPORA") == list(corpora.CORPORA)
    for name in ("FPS", "ROI_SIZE", "SAMPLE_RATE"):
        assert getattr(convert_avspeech, name) == getattr(corpus_avspeech, name), name
    with pytest.raises(LookupError, match="no top-level literal NOWHERE"):
        module_constant("xmodal.search", "NOWHERE")
