"""The comparator and report, from fixture records and a fixture claims file."""
import collections
import csv
import dataclasses
import gzip
import textwrap
from pathlib import Path

import pytest
import yaml

from repro.claims import load_paper, load_published
from repro.context import DEFAULT_RECORDS, PROJECT_ROOT
from repro.records import PACK_ABOVE_BYTES, Row, RunRecord, save_record, write_json_atomic
from repro.report import OTHER_HARDWARE, README_END, README_START, build_report, evaluate, main

H100 = {"gpu_name": "NVIDIA H100 80GB HBM3"}
H200 = {"gpu_name": "NVIDIA H200"}
CLAIMS = textwrap.dedent("""
    paper: toy
    title: A toy paper
    source: arXiv:0000.00000
    claims:
      - {id: fast, claim: "3x faster", value: 3.0, unit: x, higher_is_better: true, hardware: A100, setting: s,
         source: Fig 1, verified: true, task: bench,
         compare: {kind: ratio, metric: speedup, providers: [ours], where: {mode: fwd}, aggregate: mean}}
      - {id: near, claim: "2x faster", value: 2.0, unit: x, higher_is_better: true, hardware: A100, setting: s,
         source: Fig 1, verified: true, task: bench,
         compare: {kind: ratio, metric: speedup, providers: [ours], where: {mode: bwd}, tolerance: 0.1}}
      - {id: slow, claim: "4x faster", value: 4.0, unit: x, higher_is_better: true, hardware: A100, setting: s,
         source: Fig 1, verified: false, task: bench,
         compare: {kind: ratio, metric: speedup, providers: [ours], where: {mode: bwd}}}
      - {id: abs_time, claim: "7 ms", value: 7.0, unit: ms, higher_is_better: false, hardware: A100-40GB,
         setting: s, source: T2, verified: true, task: bench,
         compare: {kind: absolute, metric: time, providers: [ours], where: {mode: fwd}}}
      - {id: peak, claim: "20% of peak", value: 20.0, unit: "%", higher_is_better: true, hardware: A100,
         setting: s, source: T3, verified: true, task: bench,
         compare: {kind: peak_fraction, metric: tflops, providers: [ours], aggregate: max}}
      - {id: quality, claim: "accuracy 60%", value: 60.0, unit: "%", higher_is_better: true, hardware: n/a,
         setting: s, source: T4, verified: true, task: train,
         compare: {kind: absolute, metric: accuracy, providers: [ours], comparable_at: [paper]}}
      - {id: later, claim: "later", value: 1.0, unit: x, higher_is_better: true, hardware: A100, setting: s,
         source: T5, verified: true, task: not_written_yet,
         compare: {kind: ratio, metric: speedup, providers: [ours]}}
      - {id: no_provider, claim: "theirs", value: 1.0, unit: x, higher_is_better: true, hardware: A100,
         setting: s, source: T6, verified: true, task: bench,
         compare: {kind: ratio, metric: speedup, providers: [not_written_yet]}}
      - {id: paper_setting, claim: "at the paper's length", value: 1.0, unit: x, higher_is_better: true,
         hardware: A100, setting: s, source: T7, verified: true, task: train,
         compare: {kind: absolute, metric: accuracy, providers: [ours], where: {mode: long}, comparable_at: [paper]}}
""")


PLOTS = {"bench": ["speedup", "tflops"], "train": ["accuracy", "tokens_per_s"]}


def rec(task, scale, rows, started="2026-11-26T10:00:00+00:00", env=H100, status="ok"):
    return RunRecord(task=task, paper="toy", scale=scale, claim_ids=[], config={"task": {"plot": PLOTS.get(task, [])}},
                     overrides=[], env=dict(env), started=started, status=status, rows=rows)


def row(metric, value, mode="fwd", provider="ours"):
    return Row(provider, "n", 1024, metric, "x", value, value, value, 10, extra={"mode": mode, "series": "a"})


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "published").mkdir()
    (tmp_path / "published" / "toy.yaml").write_text(CLAIMS)
    runs = tmp_path / "runs"
    save_record(rec("bench", "small", [row("speedup", 3.5), row("speedup", 1.9, "bwd"), row("time", 5.0),
                                       row("tflops", 400.0), row("speedup", 1.0, provider="base")]),
                runs / "toy" / "bench" / "a.json")
    # an older record at the same scale, and a newer one at smoke scale, must both lose to it
    save_record(rec("bench", "small", [row("speedup", 0.1)], started="2026-11-01T00:00:00+00:00"),
                runs / "toy" / "bench" / "old.json")
    save_record(rec("bench", "smoke", [row("speedup", 0.1)], started="2026-11-30T00:00:00+00:00", env={}),
                runs / "toy" / "bench" / "smoke.json")
    save_record(rec("train", "small", [row("accuracy", 55.0)]), runs / "toy" / "train" / "t.json")
    (runs / "broken.json").write_text("{not json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{README_START}\nold table\n{README_END}\n\nrest\n")
    return tmp_path


@pytest.fixture
def no_plots(monkeypatch):
    """For the tests of the report's text and exit status: drawing the plots takes most of a build's time, and
    test_outputs_csv_plots_and_readme checks them."""
    monkeypatch.setattr("repro.report.plot_rows", lambda *args, **kwargs: [])


def test_statuses_from_fixture_records(tree, no_plots):
    report, problems = build_report(tree / "runs", tree / "published", tree / "out", tree / "README.md")
    line = {c: next(l for l in report.splitlines() if f"toy:{c}," in l) for c in
            ("fast", "near", "slow", "abs_time", "peak", "quality", "later", "no_provider", "paper_setting")}
    assert line["fast"].endswith("| reproduced |") and "3.5x" in line["fast"]
    assert line["near"].endswith("| within tolerance |")
    assert line["slow"].endswith("| not reproduced |") and "(unverified)" in line["slow"]
    assert line["abs_time"].endswith("| not comparable (other hardware) |")
    assert line["peak"].endswith("| reproduced |") and "40.4%" in line["peak"]  # 400 / 989.4
    # a card whose peak is not known: not the scale's fault, and the value is no fraction of anything
    l40s = rec("bench", "small", [row("tflops", 400.0)], env={"gpu_name": "NVIDIA L40S"})
    claim = next(c for c in load_paper(tree / "published" / "toy.yaml")[2] if c.id == "peak")
    outcome = evaluate(claim, [(Path("l40s.json"), l40s)])
    assert (outcome.status, outcome.value) == (OTHER_HARDWARE, 400.0)
    assert outcome.detail.endswith("; no known peak for this GPU")
    assert line["quality"].endswith("| not comparable at this scale |")
    assert line["later"].endswith("| not yet run |")
    assert line["no_provider"].endswith("| not yet run |") and "not_written_yet" in line["no_provider"]
    # a record of the task that lacks the claim's setting is not cited as its source
    assert line["paper_setting"].endswith("| not yet run |") and "'mode': 'long'" in line["paper_setting"]
    assert "t.json" not in line["paper_setting"]
    assert any("broken.json" in p for p in problems) and "broken.json" in report
    from repro.report import _rel
    from repro.context import PROJECT_ROOT
    assert _rel(PROJECT_ROOT / "results" / "runs" / "x.json") == "results/runs/x.json"  # no local paths in the report


def test_the_console_table_names_each_claim_whole_in_columns_as_wide_as_their_cells(tree):
    """It cut ids at 44 characters (llama7b_8x_soft_prompt_matches_dense_accurac), and a published value wider
    than 10 ("0.706 accuracy") pushed its row's later columns out of line."""
    from repro.report import console_table
    claims = {c.id: c for c in load_paper(tree / "published" / "toy.yaml")[2]}
    long = dataclasses.replace(claims["fast"], id="a_claim_whose_id_is_longer_than_forty_four_characters", value=0.706,
                               unit="accuracy")
    record = rec("bench", "small", [row("speedup", 3.5)])
    outcomes = [evaluate(c, [(Path("a.json"), record)]) for c in (long, claims["slow"])]
    lines = console_table(outcomes).splitlines()
    assert lines[2].startswith("a_claim_whose_id_is_longer_than_forty_four_characters 0.706 accuracy")
    assert [line.index(f"  {o.status}") + 2 for line, o in zip(lines[2:], outcomes)] == [lines[0].index("status")] * 2
    assert len(lines[1]) == len(lines[0])
    # a claim measured and not held, with no value, says why; one not yet run does not list what it lacks
    oom = Row("ours", "n", 1024, "time", "ms", status="oom", extra={"mode": "fwd", "series": "a"})
    failed = rec("bench", "small", [oom, row("time", 1.0, provider="base")])
    lines = console_table([evaluate(claims["fast"], [(Path("f.json"), failed)]),
                           evaluate(claims["fast"], [])]).splitlines()
    assert lines[2].endswith("not reproduced  [ours failed at all 1 of the claim's points (out of memory or an error)]")
    assert lines[3].endswith("not yet run")


def test_a_provider_whose_output_differed_from_the_baseline_failed_at_that_point(tree, no_plots):
    """Its rows measured another function: no value, and a failed point of the claim, as one out of memory is."""
    def point(x, provider="ours", matches=None):
        extra = {"mode": "fwd", "series": "a", "matches_baseline": matches}
        return [Row(provider, "n", x, metric, unit, 3.0, extra=extra)
                for metric, unit in (("time", "ms"), ("speedup", "x"))]
    newer = rec("bench", "small", point(1024, matches=False) + point(1024, "base"), started="2026-11-28T00:00:00+00:00")
    save_record(newer, tree / "runs" / "toy" / "bench" / "newer.json")
    report, _ = build_report(tree / "runs", tree / "published", tree / "out", tree / "README.md")
    line = next(l for l in report.splitlines() if "toy:fast," in l)  # not the older record's 3.5x
    assert "newer.json" in line and line.endswith("| not reproduced |")
    assert "ours failed at all 1 of the claim's points (1 with output unlike the baseline's)" in line
    newer.rows += point(2048, matches=True) + point(2048, "base")
    save_record(newer, tree / "runs" / "toy" / "bench" / "newer.json")
    report, _ = build_report(tree / "runs", tree / "published", tree / "out", tree / "README.md")
    line = next(l for l in report.splitlines() if "toy:fast," in l)
    # the value's cell (a bare "3x" is in every line of this claim: its text and published value)
    assert "| 3x <br><sub>ours, mean of 1; 1 more failed (1 with output unlike the baseline's)" in line


def test_a_report_of_a_subfolder_of_the_runs_applies_the_retraction_list_of_the_folder_above(tree, no_plots):
    """`--runs results/runs/<paper>`: the list lives in results/runs and names records by their paths there."""
    runs = tree / "runs"
    save_record(rec("bench", "small", [row("speedup", 9.0)], started="2026-12-01T00:00:00+00:00"),
                runs / "toy" / "bench" / "wrong.json")
    (runs / "retracted.yaml").write_text("toy/bench/wrong.json: made before the fix of the timer\n"
                                         "other/bench/elsewhere.json: a record of another paper\n"
                                         "toy/bench/gone.json: a name that is no record\n")
    report, problems = build_report(runs / "toy", tree / "published", tree / "out", tree / "README.md")
    assert "3.5x" in next(line for line in report.splitlines() if "toy:fast," in line)
    assert "made before the fix of the timer" in report[report.index("## Retracted records"):]
    named = [p for p in problems if "retracted.yaml" in p]
    assert len(named) == 1 and "toy/bench/gone.json" in named[0]  # not the other paper's, outside this folder


def test_a_retracted_record_is_listed_with_its_reason_and_used_for_nothing(tree, no_plots):
    runs = tree / "runs"
    save_record(rec("bench", "small", [row("speedup", 9.0)], started="2026-12-01T00:00:00+00:00"),
                runs / "toy" / "bench" / "wrong.json")
    report, problems = build_report(runs, tree / "published", tree / "out", tree / "README.md")
    assert "9x" in next(line for line in report.splitlines() if "toy:fast," in line)  # newest, most points
    (runs / "retracted.yaml").write_text("toy/bench/wrong.json: made before the fix of the timer\n"
                                         "toy/bench/gone.json: a name that is no record\n")
    report, problems = build_report(runs, tree / "published", tree / "out", tree / "README.md")
    assert "3.5x" in next(line for line in report.splitlines() if "toy:fast," in line)
    listed = report[report.index("## Retracted records"):]
    assert "[`toy/bench/wrong.json`](../runs/toy/bench/wrong.json)" in listed
    assert "made before the fix of the timer" in listed
    assert any("gone.json" in p for p in problems) and not any("wrong.json" in p for p in problems)
    with gzip.open(tree / "out" / "report" / "rows.csv.gz", "rt") as fh:
        assert "wrong.json" not in fh.read()
    # some of its rows: those of the metrics named, the others still judged
    (runs / "retracted.yaml").write_text("toy/bench/wrong.json: {metrics: [speedup], why: a wrong baseline}\n")
    save_record(rec("bench", "small", [row("speedup", 9.0), row("peak_memory", 1.0)],
                    started="2026-12-01T00:00:00+00:00"), runs / "toy" / "bench" / "wrong.json")
    report, problems = build_report(runs, tree / "published", tree / "out", tree / "README.md")
    assert "3.5x" in next(line for line in report.splitlines() if "toy:fast," in line)
    assert "(../runs/toy/bench/wrong.json) (" in report and "), its rows of speedup: a wrong baseline" in report
    with gzip.open(tree / "out" / "report" / "rows.csv.gz", "rt") as fh:
        kept = [line for line in fh.read().splitlines() if "wrong.json" in line]
    assert len(kept) == 1 and "peak_memory" in kept[0]
    assert kept[0].split(",")[5] == "ok"  # the run's status: a run that ended in an error is told apart
    # some rows of a metric: those that match `where`
    (runs / "retracted.yaml").write_text("toy/bench/wrong.json: {metrics: [peak_memory], where: {mode: fwd}, "
                                         "why: the baseline's graph was alive}\n")
    save_record(rec("bench", "small", [row("peak_memory", 1.0), row("peak_memory", 2.0, "bwd")],
                    started="2026-12-01T00:00:00+00:00"), runs / "toy" / "bench" / "wrong.json")
    report, _ = build_report(runs, tree / "published", tree / "out", tree / "README.md")
    assert "its rows of peak_memory, mode=fwd: the baseline's graph was alive" in report
    with gzip.open(tree / "out" / "report" / "rows.csv.gz", "rt") as fh:
        kept = [line for line in fh.read().splitlines() if "wrong.json" in line]
    assert len(kept) == 1 and '""mode"": ""bwd""' in kept[0]
    # several retractions of one record: each applies
    (runs / "retracted.yaml").write_text("toy/bench/wrong.json:\n"
                                         "  - {metrics: [peak_memory], where: {mode: fwd}, why: graph alive}\n"
                                         "  - {metrics: [peak_memory], where: {mode: bwd}, why: another}\n")
    report, _ = build_report(runs, tree / "published", tree / "out", tree / "README.md")
    assert "mode=fwd: graph alive" in report and "mode=bwd: another" in report
    with gzip.open(tree / "out" / "report" / "rows.csv.gz", "rt") as fh:
        assert "wrong.json" not in fh.read()
    # a pattern of names: every record it matches, with the entries of each key that matches it
    save_record(rec("bench", "small", [row("peak_memory", 3.0, "bwd")], started="2026-12-02T00:00:00+00:00"),
                runs / "toy" / "bench" / "also.json")
    (runs / "retracted.yaml").write_text("toy/bench/*.json: {metrics: [peak_memory], where: {mode: bwd}, "
                                         "why: before the fix}\n"
                                         "toy/bench/wrong.json: {metrics: [peak_memory], where: {mode: fwd}, why: x}\n"
                                         "toy/other/*: {metrics: [speedup], why: matches no record}\n")
    report, problems = build_report(runs, tree / "published", tree / "out", tree / "README.md")
    assert "[`toy/bench/also.json`]" in report and "mode=bwd: before the fix" in report
    with gzip.open(tree / "out" / "report" / "rows.csv.gz", "rt") as fh:
        text = fh.read()
        assert "wrong.json" not in text and "also.json" not in text
    # the pattern's entry retracts rows of some of its records, not of a.json (no peak memory): no problem
    assert [p for p in problems if "retracted.yaml" in p] == \
        ["retracted.yaml names toy/other/*, which is no record under " + str(runs)]
    # an entry that retracts no row of any record its name matches: a typo, named as unknown names are
    (runs / "retracted.yaml").write_text("toy/bench/*.json: {metrics: [peak_memory], where: {mode: bwd}, why: fix}\n"
                                         "toy/bench/also.json: {metrics: [peak_memory], where: {mode: bwd}, why: y}\n"
                                         "toy/bench/wrong.json: {metrics: [peak_memroy], where: {mode: fwd}, "
                                         "why: x}\n")
    report, problems = build_report(runs, tree / "published", tree / "out", tree / "README.md")
    assert [p for p in problems if "retracted.yaml" in p] == \
        ["retracted.yaml: the entry of toy/bench/wrong.json for its rows of peak_memroy, mode=fwd retracts no row of "
         "any record it names"]  # also.json's entry retracts rows the pattern's retracted first: no problem either
    for bad in ("- toy/bench/wrong.json\n", "toy/bench/wrong.json: {metrics: [], why: none}\n",
                "toy/bench/wrong.json: one\ntoy/bench/wrong.json.gz: the other replaced it\n"):
        (runs / "retracted.yaml").write_text(bad)
        with pytest.raises(ValueError, match="retracted.yaml"):
            build_report(runs, tree / "published", tree / "out", tree / "README.md")


def test_a_cpu_record_judges_only_the_claims_no_hardware_is_named_for(tree, no_plots):
    runs = tree / "runs" / "toy"
    save_record(rec("bench", "small", [row("speedup", 9.0), row("speedup", 2.5)], started="2026-12-01T00:00:00+00:00",
                    env={}), runs / "bench" / "cpu.json")
    save_record(rec("train", "paper", [row("accuracy", 61.0)], started="2026-12-01T00:00:00+00:00", env={}),
                runs / "train" / "cpu.json")
    report, _ = build_report(tree / "runs", tree / "published", tree / "out", None)
    lines = report.splitlines()
    fast = next(line for line in lines if "toy:fast," in line)  # a speed on an A100: from the H100 record
    assert "3.5x" in fast and "cpu" not in fast and not any("toy:fast" in line and "cpu" in line for line in lines)
    quality = next(line for line in lines if "toy:quality," in line)  # hardware n/a: the CPU record may judge it
    assert "61" in quality and "cpu, paper" in quality and quality.endswith("| reproduced |")


def test_record_links_resolve_from_the_file_they_are_written_into(tree, no_plots):
    report, _ = build_report(tree / "runs", tree / "published", tree / "out", tree / "README.md")
    line = next(line for line in report.splitlines() if "toy:fast," in line)
    assert "([record](../runs/toy/bench/a.json))" in line  # REPORT.md is in out/, the records in runs/
    readme_line = next(line for line in (tree / "README.md").read_text().splitlines() if "toy:fast," in line)
    assert "([record](runs/toy/bench/a.json))" in readme_line


def test_outputs_csv_plots_and_readme(tree):
    build_report(tree / "runs", tree / "published", tree / "out", tree / "README.md")
    written = (tree / "out" / "report" / "rows.csv.gz").read_bytes()
    build_report(tree / "runs", tree / "published", tree / "out", tree / "README.md")
    assert (tree / "out" / "report" / "rows.csv.gz").read_bytes() == written  # no timestamp: no churn in git
    with gzip.open(tree / "out" / "report" / "rows.csv.gz", "rt") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 + 1 + 1 + 1 and {r["task"] for r in rows} == {"bench", "train"}
    assert sorted(p.name for p in (tree / "out" / "report" / "plots").glob("*.png")) == \
        ["bench_speedup.png", "bench_tflops.png", "train_accuracy.png"]
    readme = (tree / "README.md").read_text()
    assert "old table" not in readme and "| toy | 9 | 2 | 1 | 1 | 1 | 1 | 3 |" in readme
    assert readme.startswith("# Title") and readme.rstrip().endswith("rest")


def test_the_report_on_disk_has_all_of_its_plots_whenever_it_is_replaced(tree, monkeypatch):
    """A build that fails after writing REPORT.md, or before, leaves a report whose images are all there."""
    import re

    from repro import report as module

    names = iter([["bench_old.png", "bench_kept.png"], ["bench_kept.png", "bench_new.png"]])
    drawn = []

    def draw(task, rows, title, out_dir, metrics, card="", lines=None):
        if task != "bench":
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / name for name in next(names)]
        for path in paths:
            path.write_bytes(b"png")
        return paths

    def images_there(text):
        return all((tree / "out" / link).is_file() for link in re.findall(r"\]\((report/plots/[^)]+)\)", text))

    def replace(path, write, original=module.replace_atomically):
        if path.name == "REPORT.md":
            new = tree / "new_report.md"
            write(new)
            drawn.append(images_there(new.read_text()) and (not path.exists() or images_there(path.read_text())))
        original(path, write)

    monkeypatch.setattr(module, "plot_rows", draw)
    monkeypatch.setattr(module, "replace_atomically", replace)
    build_report(tree / "runs", tree / "published", tree / "out", None)
    build_report(tree / "runs", tree / "published", tree / "out", None)
    assert drawn == [True, True]
    assert sorted(p.name for p in (tree / "out" / "report" / "plots").iterdir()) == ["bench_kept.png", "bench_new.png"]
    assert not (tree / "out" / "report" / "plots.drawing").exists()


def test_a_record_whose_error_is_not_text_is_skipped_naming_the_field(tree, no_plots):
    """The list of records that were not used read it as text: an AttributeError stopped the report."""
    failed = rec("bench", "small", [], status="error").to_json()
    write_json_atomic(tree / "runs" / "toy" / "bench" / "failed.json", {**failed, "error": 3})
    report, problems = build_report(tree / "runs", tree / "published", tree / "out", None)
    assert any("failed.json" in p and "error is int, not str or null" in p for p in problems), problems


def test_cli_exit_codes(tree, capsys, no_plots):
    args = ["--runs", str(tree / "runs"), "--published", str(tree / "published"), "--out", str(tree / "out"),
            "--readme", ""]
    assert main(args) == 1  # a record it could not use: named on stderr, and the exit status says so
    assert "broken.json" in capsys.readouterr().err
    assert main([*args, "--allow-skipped"]) == 0
    # the tree has small records: their toy tasks name no metric to plot, which is why there are none
    assert ("rows.csv.gz, no plots (drawn from small and paper records alone, of the metrics their task.plot names: "
            "none here)\n") in capsys.readouterr().out
    (tree / "runs" / "broken.json").unlink()
    assert main(args) == 0
    (tree / "published" / "bad.yaml").write_text("paper: bad\nclaims: [{id: x}]\n")
    assert main(args) == 2
    assert "missing keys" in capsys.readouterr().err


def test_a_claims_or_retraction_file_that_is_not_yaml_is_named_with_where_it_breaks(tree, capsys, no_plots):
    args = ["--runs", str(tree / "runs"), "--published", str(tree / "published"), "--out", str(tree / "out"),
            "--readme", "", "--allow-skipped"]
    (tree / "runs" / "retracted.yaml").write_text("toy/bench/a.json: [unclosed\n")
    assert main(args) == 2
    assert f"repro-report: {tree / 'runs' / 'retracted.yaml'}: not valid YAML at line 2, column 1: " \
        in capsys.readouterr().err
    (tree / "published" / "toy.yaml").write_text(CLAIMS + "  - {id: [\n")
    assert main(args) == 2
    assert f"repro-report: {tree / 'published' / 'toy.yaml'}: not valid YAML at line " in capsys.readouterr().err


def test_the_projects_readme_is_refreshed_only_from_the_committed_records_unless_named(tree, monkeypatch):
    built = []
    monkeypatch.setattr("repro.report.build_report", lambda runs, published, out, readme: built.append(readme) or
                        ("", []))
    main(["--pack-above-mb", "0"])
    main(["--pack-above-mb", "0", "--runs", str(tree / "runs"), "--out", str(tree / "out")])  # a user's smoke runs
    main(["--pack-above-mb", "0", "--out", str(tree / "out"), "--readme", str(tree / "README.md")])
    assert built == [PROJECT_ROOT / "README.md", None, tree / "README.md"]


def test_only_the_committed_records_are_packed_unless_asked(tree, monkeypatch):
    """A report of outputs/ packed a large job's record.json, after which its folder no longer read as taken."""
    packed = []
    monkeypatch.setattr("repro.report.pack_records", lambda runs, above: packed.append((runs, above)) or [])
    monkeypatch.setattr("repro.report.build_report", lambda *args: ("", []))
    main(["--readme", ""])
    main(["--runs", str(PROJECT_ROOT / "results" / "runs" / "toy"), "--readme", ""])
    main(["--runs", str(tree / "runs"), "--out", str(tree / "out")])
    main(["--runs", str(tree / "runs"), "--out", str(tree / "out"), "--pack-above-mb", "2"])
    toy = PROJECT_ROOT / "results" / "runs" / "toy"
    assert packed == [(DEFAULT_RECORDS, PACK_ABOVE_BYTES), (toy, PACK_ABOVE_BYTES), (tree / "runs", 2 * 2**20)]


def test_claim_files_are_strict(tmp_path):
    data = yaml.safe_load(CLAIMS)
    data["claims"][0]["compare"]["kind"] = "vibes"
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="vibes"):
        load_paper(tmp_path / "toy.yaml")
    data = yaml.safe_load(CLAIMS)
    data["claims"][1]["id"] = "fast"
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="duplicate"):
        load_paper(tmp_path / "toy.yaml")


def test_published_claims_cover_all_six_papers():
    root = Path(__file__).resolve().parents[1] / "results" / "published"
    papers = load_published(root)
    assert set(papers) == {"flashattention", "lean_attention", "scissorhands", "pregated_moe",
                           "compress_then_prompt", "greenformers"}
    for name, (header, claims) in papers.items():
        assert header.get("title") and claims, name


def test_plots_take_each_series_and_mode_from_the_newest_record_that_has_it():
    from repro.report import rows_to_plot

    def series_row(series, value, mode="fwd"):
        return Row("ours", "n", 1, "speedup", "x", value, value, value, 1, extra={"series": series, "mode": mode})

    old = rec("bench", "small", [series_row("a", 1.0), series_row("b", 2.0)], started="2026-11-01T00:00:00+00:00")
    new = rec("bench", "small", [series_row("a", 3.0)], started="2026-11-02T00:00:00+00:00")
    newer = rec("bench", "small", [series_row("a", 4.0, "fwd_bwd")], started="2026-11-03T00:00:00+00:00")
    rows, used = rows_to_plot([(Path("old"), old), (Path("new"), new),
                                        (Path("newer"), newer)])["bench", old.gpu_name]
    # a newer run of series a's forward+backward keeps its forward from the run before
    assert sorted((r.extra["series"], r.extra["mode"], r.p50) for r in rows) == [
        ("a", "fwd", 3.0), ("a", "fwd_bwd", 4.0), ("b", "fwd", 2.0)]
    assert used == [newer, new, old]
    # a record whose rows have no mode (made before the task timed several) stands for every mode of its series
    older = rec("bench", "small", [series_row("a", 0.5, ""), series_row("c", 0.5, "")],
                started="2026-10-01T00:00:00+00:00")
    rows, _ = rows_to_plot([(Path("older"), older), (Path("new"), new)])["bench", old.gpu_name]
    assert sorted((r.extra["series"], r.extra["mode"], r.p50) for r in rows) == [("a", "fwd", 3.0), ("c", "", 0.5)]


def test_a_run_narrowed_to_one_point_does_not_hide_a_sweep():
    from repro.report import rows_to_plot

    def point(x, value):
        return Row("ours", "n", x, "speedup", "x", value, extra={"series": "a", "mode": "fwd"})

    sweep = rec("bench", "small", [point(x, 1.0) for x in (1, 2, 3)], started="2026-11-01T00:00:00+00:00")
    narrow = rec("bench", "small", [point(3, 2.0)], started="2026-11-02T00:00:00+00:00")
    newer_sweep = rec("bench", "small", [point(x, 3.0) for x in (1, 2, 3)], started="2026-11-03T00:00:00+00:00")
    rows, used = rows_to_plot([(Path("s"), sweep), (Path("n"), narrow)])["bench", sweep.gpu_name]
    assert [r.p50 for r in rows] == [1.0] * 3 and used == [sweep]
    rows, used = rows_to_plot([(Path("s"), sweep), (Path("n"), narrow),
                               (Path("t"), newer_sweep)])["bench", sweep.gpu_name]
    assert [r.p50 for r in rows] == [3.0] * 3 and used == [newer_sweep]
    # a newer run a point short (a training run that logged one step fewer) is still the one plotted
    short = rec("bench", "small", [point(x, 4.0) for x in (1, 2)], started="2026-11-04T00:00:00+00:00")
    rows, used = rows_to_plot([(Path("t"), newer_sweep), (Path("u"), short)])["bench", sweep.gpu_name]
    assert used == [short]


def test_each_line_comes_from_the_best_record_that_has_it():
    """A sweep whose rows of a provider or of a metric were retracted hides no later, narrower run's rows of them;
    and a line's rows come from one record, never some from each."""
    from repro.report import rows_to_plot

    def point(provider, x, value, metric="speedup"):
        return Row(provider, "n", x, metric, "x", value, extra={"series": "a", "mode": "fwd"})

    # as the report sees a sweep whose rows of `split`, and of `ours`' time, were retracted
    sweep = rec("bench", "small", [point("ours", x, 1.0) for x in (1, 2, 3, 4)] +
                [point("base", x, 1.0, "time") for x in (1, 2, 3, 4)], started="2026-11-01T00:00:00+00:00")
    rerun = rec("bench", "small", [point("ours", 4, 2.0), point("ours", 4, 2.0, "time"), point("split", 4, 3.0),
                                   point("split", 4, 3.0, "time")], started="2026-11-02T00:00:00+00:00")
    rows, used = rows_to_plot([(Path("s"), sweep), (Path("r"), rerun)])["bench", sweep.gpu_name]
    lines = collections.defaultdict(list)
    for r in rows:
        lines[r.provider, r.metric].append((r.x_value, r.p50))
    # `ours`' speedups: the sweep's four, none of the narrower run's
    assert dict(lines) == {("ours", "speedup"): [(x, 1.0) for x in (1, 2, 3, 4)],
                           ("base", "time"): [(x, 1.0) for x in (1, 2, 3, 4)], ("ours", "time"): [(4, 2.0)],
                           ("split", "speedup"): [(4, 3.0)], ("split", "time"): [(4, 3.0)]}
    assert used == [rerun, sweep]
    # a newer run in which `split` failed (out of memory) has no line of it to draw: the one that measured it does
    failed = rec("bench", "small", [Row("split", "n", 4, "speedup", "x", None, status="oom",
                                        extra={"series": "a", "mode": "fwd"})], started="2026-11-03T00:00:00+00:00")
    rows, used = rows_to_plot([(Path("s"), sweep), (Path("r"), rerun), (Path("f"), failed)])["bench", sweep.gpu_name]
    assert [(r.x_value, r.p50) for r in rows if (r.provider, r.metric) == ("split", "speedup")] == [(4, 3.0)]
    # a run older than the panel's sweep draws none of its lines there (a provider since renamed)
    older = rec("bench", "small", [point("flash", x, 1.5) for x in (1, 2, 3, 4)],
                started="2026-10-01T00:00:00+00:00")
    rows, used = rows_to_plot([(Path("o"), older), (Path("s"), sweep), (Path("r"), rerun)])["bench", sweep.gpu_name]
    assert "flash" not in {r.provider for r in rows} and older not in used


def test_each_card_gets_its_own_plots_from_its_own_newest_records(tree, monkeypatch):
    """A newer run on one card hides nothing of another card's: each card's series come from its own records,
    in plots named by card."""
    from repro.report import rows_to_plot

    def series_row(series, value):
        return Row("ours", "n", 1, "speedup", "x", value, extra={"series": series})

    h100 = rec("bench", "small", [series_row("a", 1.0), series_row("b", 2.0)], started="2026-11-01T00:00:00+00:00")
    h200 = rec("bench", "small", [series_row("a", 3.0)], started="2026-11-02T00:00:00+00:00", env=H200)
    by_card = rows_to_plot([(Path("old"), h100), (Path("new"), h200)])
    assert {card: sorted((r.extra["series"], r.p50) for r in rows) for (_, card), (rows, _) in by_card.items()} == {
        h100.gpu_name: [("a", 1.0), ("b", 2.0)], h200.gpu_name: [("a", 3.0)]}

    plotted = []
    monkeypatch.setattr("repro.report.plot_rows", lambda task, rows, title, out, metrics, card="", lines=None:
                        plotted.append((task, card, title)) or [])
    save_record(h200, tree / "runs" / "toy" / "bench" / "h200.json")
    build_report(tree / "runs", tree / "published", tree / "out", None)
    assert sorted((task, card) for task, card, _ in plotted) == [("bench", "h100_80gb_hbm3"), ("bench", "h200"),
                                                                 ("train", "")]  # one card: names as before
    assert all(card.split("_")[0] in title.lower() for _, card, title in plotted)


def test_a_ratio_over_several_baselines_gets_one_plot_per_baseline(tmp_path):
    from repro.report import plot_rows

    def speedup(provider, x, baseline, value):
        return Row(provider, "n", x, "speedup", "x", value, extra={"baseline": baseline})

    rows = [speedup("ours", n, base, v) for n in (1, 2) for base, v in (("eager", 3.0), ("megatron", 1.5))]
    rows.append(Row("ours", "n", 1, "tokens_per_s", "tokens/s", 10.0))
    names = sorted(p.name for p in plot_rows("bench", rows, "t", tmp_path, ["speedup", "tokens_per_s"]))
    assert names == ["bench_speedup_vs_eager.png", "bench_speedup_vs_megatron.png", "bench_tokens_per_s.png"]


@pytest.mark.parametrize("policies, drawn_by", [
    (["full", "scissorhands"], ("policy", "kv_bits")),
    # two providers that share a policy and a bit width would merge into one line: a colour per provider then
    (["scissorhands", "scissorhands"], ("provider", None)),
    # and a provider without the extra has no policy to be coloured by
    (["full", None], ("provider", None)),
])
def test_a_task_can_draw_its_lines_by_colour_and_dash_from_row_extras(tmp_path, monkeypatch, policies, drawn_by):
    import seaborn

    from repro.report import plot_rows

    drawn = []
    relplot = seaborn.relplot
    monkeypatch.setattr(seaborn, "relplot", lambda **kw: drawn.append((kw["hue"], kw.get("style"))) or relplot(**kw))
    rows = [Row(f"{policy}_{i}_{bits}", "kv_compression", x * (16 / bits), "perplexity", "ppl", 60.0 + x + i,
                extra={"kv_bits": bits} if policy is None else {"policy": policy, "kv_bits": bits})
            for i, policy in enumerate(policies) for bits in (16, 4) for x in (1, 2)]
    plot_rows("bench", rows, "t", tmp_path, ["perplexity"], lines={"hue": "policy", "style": "kv_bits"})
    assert drawn == [drawn_by]


@pytest.mark.parametrize("providers, drawn_by", [(3, ("provider", None)), (11, ("provider", "provider"))])
def test_more_lines_than_the_palette_has_colours_get_a_marker_each(tmp_path, monkeypatch, providers, drawn_by):
    import seaborn

    from repro.report import plot_rows

    drawn = []
    relplot = seaborn.relplot
    monkeypatch.setattr(seaborn, "relplot", lambda **kw: drawn.append((kw["hue"], kw.get("style"))) or relplot(**kw))
    rows = [Row(f"p{i}", "n", n, "speedup", "x", 1.0 + i + n) for i in range(providers) for n in (1, 2)]
    plot_rows("bench", rows, "t", tmp_path, ["speedup"])
    assert drawn == [drawn_by]


@pytest.mark.parametrize("series, per_panel", [(["only"], True), (["batch 1", "batch 8"], False)])
def test_a_grid_of_several_rows_names_its_y_axis_once(tmp_path, monkeypatch, series, per_panel):
    """A panel's own y label, longer than a panel is high, runs into the panels above and below."""
    import matplotlib.pyplot

    from repro.report import plot_rows

    figures = []
    monkeypatch.setattr(matplotlib.pyplot, "close", figures.append)
    rows = [Row("ours", "n", n, "speedup", "x", 1.0 + n, extra={"series": s}) for s in series for n in (1, 2)]
    plot_rows("bench", rows, "t", tmp_path, ["speedup"])
    (figure,) = figures
    labels = {ax.get_ylabel() for ax in figure.axes}
    assert labels == ({"speedup (x)"} if per_panel else {""})
    assert (figure.get_supylabel() == "") == per_panel


def test_named_points_and_points_at_zero_plot_without_warnings(tmp_path):
    """Tasks or models as x (bars: a line over names has no axis), and sizes from 0 (a linear axis: a log one
    cannot show 0), each plotted with no warning."""
    import warnings

    from repro.report import plot_rows

    rows = [Row(p, "lra_task", task, "speedup", "x", v) for task in ("pathfinder",) for p, v in
            (("standard", 1.0), ("flash", 4.0))]
    rows += [Row("ours", "dropout", x, "tokens_per_s", "tokens/s", 10.0 + x) for x in (0.0, 0.1, 0.2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = plot_rows("bench", rows, "t", tmp_path, ["speedup", "tokens_per_s"])
    assert sorted(p.name for p in paths) == ["bench_speedup.png", "bench_tokens_per_s.png"]
    assert all(p.stat().st_size > 0 for p in paths)


# "running": what a job killed outright (SIGKILL, its machine lost) leaves, its rows saved as each was measured
@pytest.mark.parametrize("ended, marked", [("killed", "killed run"), ("oom", "oom run"), ("running", "unfinished run")])
def test_a_run_cut_short_never_displaces_a_complete_one_and_is_used_where_none_is(tree, no_plots, ended, marked):
    runs = tree / "runs" / "toy" / "bench"
    # newer, and with more of the claim's points
    cut_short = rec("bench", "small", [row("speedup", 0.5), row("speedup", 0.7)], started="2026-12-01T00:00:00+00:00",
                    status=ended)
    save_record(cut_short, runs / "killed.json")
    report, _ = build_report(tree / "runs", tree / "published", tree / "out", None)
    fast = next(line for line in report.splitlines() if "toy:fast," in line)
    assert "3.5x" in fast and marked not in fast
    only_killed = rec("train", "paper", [row("accuracy", 61.0)], started="2026-12-01T00:00:00+00:00",
                      status=ended)
    save_record(only_killed, tree / "runs" / "toy" / "train" / "killed.json")
    report, _ = build_report(tree / "runs", tree / "published", tree / "out", None)
    quality = next(line for line in report.splitlines() if "toy:quality," in line)
    assert marked in quality and quality.endswith("| reproduced |")  # used, since no whole run exists
    assert "from 6 run record(s) under" in report and "## Records not used" not in report
    crashed = rec("train", "paper", [row("accuracy", 70.0)], started="2026-12-02T00:00:00+00:00", status="error")
    crashed.error = "RuntimeError: expected mat1 and mat2 to have the same dtype\nTraceback ..."
    save_record(crashed, tree / "runs" / "toy" / "train" / "crashed.json")
    report, _ = build_report(tree / "runs", tree / "published", tree / "out", None)
    assert "70%" not in next(line for line in report.splitlines() if "toy:quality," in line)
    # not used, and said so with why: a record that is only counted looks used
    assert "from 6 run record(s) under" in report and "(1 more not used, listed below)" in report
    listed = report[report.index("## Records not used"):]
    assert "[`toy/train/crashed.json`](../runs/toy/train/crashed.json) (NVIDIA H100 80GB HBM3, paper), ended in " \
           "error: RuntimeError: expected mat1 and mat2 to have the same dtype\n" in listed


def test_a_newer_run_with_fewer_of_a_claims_points_never_displaces_one_with_more(tree, no_plots):
    """An average over a few chosen settings does not stand for the task's average: the run with more of the
    claim's points is its source, whatever their dates; among equals, the newest."""
    runs = tree / "runs" / "toy" / "bench"
    save_record(rec("bench", "small", [row("speedup", 2.0), row("speedup", 4.0)],
                    started="2026-11-20T00:00:00+00:00"), runs / "two_points.json")
    save_record(rec("bench", "small", [row("speedup", 9.0)], started="2026-12-01T00:00:00+00:00"),
                runs / "narrowed.json")
    report, _ = build_report(tree / "runs", tree / "published", tree / "out", None)
    fast = next(line for line in report.splitlines() if "toy:fast," in line)
    assert "| 3x <br><sub>ours, mean of 2</sub>" in fast  # 2.0 and 4.0 (the claim's text and value say "3x" too)
    save_record(rec("bench", "small", [row("speedup", 5.0), row("speedup", 7.0)],
                    started="2026-12-02T00:00:00+00:00"), runs / "newer_two_points.json")
    report, _ = build_report(tree / "runs", tree / "published", tree / "out", None)
    assert "6x" in next(line for line in report.splitlines() if "toy:fast," in line)


def test_a_claim_only_its_own_card_can_judge_is_judged_on_that_card_where_a_record_has_it(tmp_path):
    from repro.report import evaluate, evaluate_by_card

    (tmp_path / "toy.yaml").write_text(CLAIMS)
    claims = {c.id: c for c in load_paper(tmp_path / "toy.yaml")[2]}
    a100 = rec("bench", "small", [row("time", 6.5)], started="2026-11-01T00:00:00+00:00",
               env={"gpu_name": "NVIDIA A100-SXM4-40GB"})
    h100 = rec("bench", "small", [row("time", 5.0)])  # newer, and on another card
    outcome = evaluate(claims["abs_time"], [(Path("h100.json"), h100), (Path("a100.json"), a100)])
    assert outcome.record == Path("a100.json") and outcome.status == "reproduced" and outcome.value == 6.5
    # a ratio is judged on any card: the newer record decides
    ratio = evaluate(claims["fast"], [(Path("h100.json"), rec("bench", "small", [row("speedup", 3.5)])),
                                      (Path("a100.json"), a100)])
    assert ratio.record == Path("h100.json")
    assert [o.record for o in evaluate_by_card(claims["abs_time"], [(Path("h100.json"), h100),
                                                                   (Path("a100.json"), a100)])] == \
        [Path("a100.json"), Path("h100.json")]
    # another card's row comes from its records beyond smoke scale, not from a smoke run that happens to have it
    h100_small_other = rec("bench", "small", [row("time", 5.0, provider="base")])
    h100_smoke = rec("bench", "smoke", [row("time", 5.0)], started="2026-12-03T00:00:00+00:00")
    assert [o.record for o in evaluate_by_card(claims["abs_time"], [(Path("a100.json"), a100),
                                                                   (Path("small.json"), h100_small_other),
                                                                   (Path("smoke.json"), h100_smoke)])] == \
        [Path("a100.json")]
    # an unknown card is not the claim's, nor is a claim's unstated hardware any card's
    l40s = rec("bench", "small", [row("time", 5.0)], env={"gpu_name": "NVIDIA L40S"})
    assert evaluate(claims["abs_time"], [(Path("l40s.json"), l40s)]).status == OTHER_HARDWARE
    unstated = dataclasses.replace(claims["abs_time"], hardware="GPU not stated")
    assert evaluate(unstated, [(Path("l40s.json"), l40s)]).status == OTHER_HARDWARE
    # a failure on another card is no more the claim's than a value there is
    failed = Row("ours", "n", 1024, "time", "ms", None, status="oom", extra={"mode": "fwd", "series": "a"})
    base = Row("base", "n", 1024, "time", "ms", 2.0, extra={"mode": "fwd", "series": "a"})
    h100.rows = [failed, base]
    outcome = evaluate(claims["abs_time"], [(Path("h100.json"), h100)])
    assert (outcome.status, outcome.value) == (OTHER_HARDWARE, None) and "failed at all 1" in outcome.detail


def test_a_record_at_a_scale_the_claim_is_comparable_at_outranks_one_on_the_claims_own_card(tmp_path):
    """`preference`'s first key: the claims' scales always include the largest, which no test told apart from it."""
    (tmp_path / "toy.yaml").write_text(CLAIMS)
    abs_time = {c.id: c for c in load_paper(tmp_path / "toy.yaml")[2]}["abs_time"]
    small_only = dataclasses.replace(abs_time, compare=dataclasses.replace(abs_time.compare, comparable_at=("small",)))
    a100 = rec("bench", "small", [row("time", 6.5)], env={"gpu_name": "NVIDIA A100-SXM4-40GB"})
    paper = rec("bench", "paper", [row("time", 6.9)], env={"gpu_name": "NVIDIA A100-SXM4-40GB"})
    outcome = evaluate(small_only, [(Path("small.json"), a100), (Path("paper.json"), paper)])
    assert (outcome.record, outcome.status, outcome.value) == (Path("small.json"), "reproduced", 6.5)
    # comparable at the paper's scale alone: the paper-scale run on another card, not the small one on its own
    paper_only = dataclasses.replace(abs_time, compare=dataclasses.replace(abs_time.compare, comparable_at=("paper",)))
    h100 = rec("bench", "paper", [row("time", 5.0)])
    outcome = evaluate(paper_only, [(Path("small.json"), a100), (Path("h100.json"), h100)])
    assert (outcome.record, outcome.status, outcome.value) == (Path("h100.json"), OTHER_HARDWARE, 5.0)


def test_largest_x_within_quality_of_the_reference():
    from repro.claims import _parse_claim
    from repro.report import claim_value, evaluate

    claim = _parse_claim("toy", "c", {
        "id": "c", "claim": "5x smaller at equal quality", "value": 5, "unit": "x", "higher_is_better": True,
        "hardware": "n/a", "setting": "s", "source": "s", "verified": True, "task": "kv",
        "compare": {"kind": "ratio", "metric": "perplexity", "providers": ["ours"], "aggregate": "largest_x_within",
                    "quality": {"reference": "full", "tolerance": 0.05, "higher_is_better": False}}})

    def ppl(provider, x, value):
        return Row(provider, "kv_compression", x, "perplexity", "ppl", value)
    record = rec("kv", "paper", [ppl("full", 1, 10.0), ppl("ours", 2, 10.2), ppl("ours", 4, 10.49),
                                 ppl("ours", 5, 10.51), ppl("ours", 10, 30.0)])
    value, unit, detail = claim_value(claim, record)
    assert value == 4 and unit == "x" and detail == "ours, largest kv_compression within 5% of full (4 points)"
    record.rows.insert(2, ppl("ours", 3, 10.6))  # beyond the tolerance: 4 and 5 no longer count
    assert claim_value(claim, record)[0] == 2
    record.rows = [ppl("full", 1, 10.0), ppl("ours", 2, 11.0), ppl("ours", 4, 10.1)]
    assert claim_value(claim, record)[0] is None
    # measured at a comparable scale, with no point within the tolerance: not reproduced (not "not yet run")
    assert evaluate(claim, [(Path("kv.json"), record)]).status == "not reproduced"
    # an older record that did reproduce it does not overrule the newer one's failure; one without the
    # reference's rows cannot judge the claim and is passed over
    older = rec("kv", "paper", [ppl("full", 1, 10.0), ppl("ours", 4, 10.1)], started="2026-11-01T00:00:00+00:00")
    unjudged = rec("kv", "paper", [ppl("ours", 8, 10.0)], started="2026-12-01T00:00:00+00:00")
    outcome = evaluate(claim, [(Path("old.json"), older), (Path("kv.json"), record), (Path("u.json"), unjudged)])
    assert outcome.status == "not reproduced" and outcome.record == Path("kv.json")
    assert evaluate(claim, [(Path("old.json"), older), (Path("u.json"), unjudged)]).value == 4
    # where none can judge it, the detail says what the best of them lacks, not what the oldest did
    bare = rec("kv", "paper", [], started="2026-11-01T00:00:00+00:00")
    outcome = evaluate(claim, [(Path("bare.json"), bare), (Path("u.json"), unjudged)])
    assert outcome.status == "not yet run" and outcome.detail.endswith("not judged, with no full row")
    raw = {"id": "c", "claim": "x", "value": 5, "unit": "x", "higher_is_better": True, "hardware": "n/a",
           "setting": "s", "source": "s", "verified": True, "task": "kv",
           "compare": {"kind": "ratio", "metric": "perplexity", "providers": ["ours"], "aggregate": "largest_x_within"}}
    with pytest.raises(ValueError, match="largest_x_within"):
        _parse_claim("toy", "c", raw)  # the aggregate needs its quality block
    # two texts the claim allows: each against its own full cache, the claim as far as it holds for both
    raw["compare"].update(where={"text": ["a", "b"]}, quality={"reference": "full", "tolerance": 0.05,
                                                                  "higher_is_better": False})
    two_texts = _parse_claim("toy", "c", raw)
    rows = [Row(p, "kv_compression", x, "perplexity", "ppl", v, extra={"text": t})
            for t, scale in (("a", 20.0), ("b", 10.0))
            for p, x, v in (("full", 1, scale), ("ours", 4, 1.01 * scale), ("ours", 5, 1.04 * scale))]
    assert claim_value(two_texts, rec("kv", "paper", rows))[0] == 5
    rows[-1].p50 = 11.0  # text b fails at 5
    assert claim_value(two_texts, rec("kv", "paper", rows))[0] == 4
    # a point that failed to run ends the run too: in its own group, or, written without the group's key (a
    # setting that failed before any text was scored), in every group
    rows[-1].p50 = 10.2
    oom = Row("ours", "kv_compression", 3, "perplexity", "ppl", None, status="oom", extra={"text": "b"})
    assert claim_value(two_texts, rec("kv", "paper", rows + [oom]))[0] is None
    oom = Row("ours", "kv_compression", 4.5, "perplexity", "ppl", None, status="error")
    assert claim_value(two_texts, rec("kv", "paper", rows + [oom]))[0] == 4
    unsupported = Row("ours", "kv_compression", 4.5, "perplexity", "ppl", None, status="unsupported")
    assert claim_value(two_texts, rec("kv", "paper", rows + [unsupported]))[0] == 5  # never tried: no failure
    # a text without the reference's row is not judged (and said so), rather than failing the claim
    no_reference = [r for r in rows if not (r.provider == "full" and r.extra["text"] == "b")]
    value, _, detail = claim_value(two_texts, rec("kv", "paper", no_reference))
    assert value == 5 and detail.endswith("not judged, with no full row: b")


def test_a_claim_is_judged_on_each_card_that_ran_its_task(tree, no_plots):
    h200 = {**H100, "gpu_name": "NVIDIA H200"}
    save_record(rec("bench", "small", [row("speedup", 2.0)], started="2026-12-02T00:00:00+00:00", env=h200),
                tree / "runs" / "toy" / "bench" / "h200.json")
    # a card that ran only the smoke scale gives no row: smoke sizes say nothing of a card's speed
    save_record(rec("bench", "smoke", [row("speedup", 9.0)], env={"gpu_name": "NVIDIA A100-SXM4-40GB"}),
                tree / "runs" / "toy" / "bench" / "a100_smoke.json")
    report, _ = build_report(tree / "runs", tree / "published", tree / "out", tree / "README.md")
    lines = report.splitlines()
    assert not any("A100-SXM4" in line for line in lines if "| 9x" in line or "a100_smoke" in line)
    first = next(i for i, line in enumerate(lines) if "toy:fast," in line)
    assert "NVIDIA H200" in lines[first] and "2x" in lines[first] and lines[first].endswith("| not reproduced |")
    assert "the same claim, another card's record" in lines[first + 1]
    assert "H100" in lines[first + 1] and "3.5x" in lines[first + 1]
    # a claim that no card measured is one row, not one a card; one measured on a card is no row of the others'
    unmeasured = [line for line in lines if "toy:no_provider" in line]
    assert len(unmeasured) == 1 and unmeasured[0].endswith("| not yet run |")
    near = [line for line in lines if "toy:near" in line]  # its backward rows: on the H100 alone
    assert len(near) == 1 and "H100" in near[0]
    readme = (tree / "README.md").read_text()
    assert "H200" in readme and "3.5x" not in readme  # the README keeps one row per claim, the chosen card's


def test_an_absolute_value_from_a_row_without_a_unit_is_shown_in_the_claims_unit():
    """Records made before the accuracy rows said "%" show 36.4%, not a bare 36.4 beside the paper's 37.6%."""
    from repro.claims import _parse_claim
    from repro.report import claim_value

    claim = _parse_claim("toy", "c", {
        "id": "c", "claim": "accuracy 37.6%", "value": 37.6, "unit": "%", "higher_is_better": True,
        "hardware": "n/a", "setting": "s", "source": "s", "verified": True, "task": "train",
        "compare": {"kind": "absolute", "metric": "val_accuracy", "providers": ["ours"], "aggregate": "max"}})
    record = rec("train", "small", [Row("ours", "step", 100, "val_accuracy", "", 36.4)])
    assert claim_value(claim, record)[:2] == (36.4, "%")
    record.rows = [Row("ours", "step", 100, "val_accuracy", "%", 36.4)]
    assert claim_value(claim, record)[:2] == (36.4, "%")


def test_a_rebuild_from_the_same_records_writes_the_same_report(tree, no_plots):
    first, _ = build_report(tree / "runs", tree / "published", tree / "out", tree / "README.md")
    again, _ = build_report(tree / "runs", tree / "published", tree / "out", tree / "README.md")
    assert first == again and "the newest started 2026-11-30T00:00:00+00:00" in first


def test_each_aggregate_and_the_claims_first_provider_decide(tmp_path):
    claims = "\n".join(
        f"  - {{id: {how}, claim: c, value: 2.0, unit: x, higher_is_better: true, hardware: A100, setting: s, "
        f"source: T, verified: true, task: bench, compare: {{kind: ratio, metric: speedup, providers: [ours, theirs], "
        f"where: {{mode: [fwd, bwd]}}, aggregate: {how}}}}}" for how in ("mean", "max", "min", "last"))
    (tmp_path / "toy.yaml").write_text(f"paper: toy\ntitle: t\nsource: s\nclaims:\n{claims}\n")
    _, _, found = load_paper(tmp_path / "toy.yaml")
    by_id = {c.id: c for c in found}
    three = rec("bench", "small", [row("speedup", 3.0), row("speedup", 1.0, "bwd"), row("speedup", 1.4, "bwd"),
                                   row("speedup", 9.0, "other")])
    values = {how: evaluate(by_id[how], [(Path("r.json"), three)]).value for how in by_id}
    assert values == {"mean": pytest.approx(5.4 / 3), "max": 3.0, "min": 1.0, "last": 1.4}
    # the last is the largest x (the final step), whatever order the rows were written in
    steps = rec("bench", "small", [Row("ours", "step", s, "speedup", "x", v, extra={"mode": "fwd"})
                                   for s, v in ((20, 2.0), (10, 1.0))])
    assert evaluate(by_id["last"], [(Path("s.json"), steps)]).value == 2.0
    # an older record of the claim's first provider outranks a newer one of its second, however many points
    ours = rec("bench", "small", [row("speedup", 2.5)], started="2026-11-01T00:00:00+00:00")
    theirs = rec("bench", "small", [row("speedup", 1.5, provider="theirs"), row("speedup", 1.6, "bwd", "theirs")])
    outcome = evaluate(by_id["mean"], [(Path("theirs.json"), theirs), (Path("ours.json"), ours)])
    assert (outcome.value, outcome.record) == (2.5, Path("ours.json"))
    ours.env["git_sha"], ours.config["model"] = "0123456789abcdef", {"name": "tiny"}
    assert evaluate(by_id["mean"], [(Path("ours.json"), ours)]).made == "2026-11-01, 0123456, tiny"


def test_a_newer_record_that_failed_at_the_claims_points_decides_it(tmp_path):
    (tmp_path / "toy.yaml").write_text(CLAIMS)
    claims = {c.id: c for c in load_paper(tmp_path / "toy.yaml")[2]}

    def failed(provider="ours"):
        return Row(provider, "n", 2048, "time", "ms", None, None, None, 0, status="oom",
                   extra={"mode": "fwd", "series": "a"})
    base = Row("base", "n", 2048, "time", "ms", 2.0, 2.0, 2.0, 10, extra={"mode": "fwd", "series": "a"})
    older = rec("bench", "small", [row("speedup", 3.5)], started="2026-11-01T00:00:00+00:00")
    newer = rec("bench", "small", [failed(), base])
    outcome = evaluate(claims["fast"], [(Path("old.json"), older), (Path("new.json"), newer)])
    assert (outcome.record, outcome.status, outcome.value) == (Path("new.json"), "not reproduced", None)
    assert "failed at all 1" in outcome.detail
    partly = rec("bench", "small", [row("speedup", 3.5), failed(), base])
    assert evaluate(claims["fast"], [(Path("p.json"), partly)]).detail == "ours, mean of 1; 1 more failed"
    # a point at which the baseline failed too is beyond the card, not a failure of the claim: it decides nothing
    beyond = rec("bench", "small", [failed(), failed("base")])
    outcome = evaluate(claims["fast"], [(Path("old.json"), older), (Path("new.json"), beyond)])
    assert (outcome.record, outcome.value) == (Path("old.json"), 3.5)
    partly.rows[-1] = failed("base")
    assert evaluate(claims["fast"], [(Path("p.json"), partly)]).detail == "ours, mean of 1"
    # the baseline measured the point only outside the claim's where (another mode): still beyond the card there
    beyond.rows.append(dataclasses.replace(base, extra={"mode": "bwd", "series": "a"}))
    assert evaluate(claims["fast"], [(Path("old.json"), older), (Path("new.json"), beyond)]).record == \
        Path("old.json")


def test_a_failure_is_at_a_ratio_claims_points_though_it_lacks_the_ratios_baseline(tmp_path):
    """A provider that failed is written on the measured metric (time), with no `baseline`: only the ratios derived
    from its time carry one. A claim on a ratio over a named baseline still sees the failure at its points."""
    (tmp_path / "toy.yaml").write_text(CLAIMS)
    fast = {c.id: c for c in load_paper(tmp_path / "toy.yaml")[2]}["fast"]
    claim = dataclasses.replace(fast, compare=dataclasses.replace(fast.compare,
                                                                  where={"mode": "fwd", "baseline": "base"}))

    def point(x, ours_ok):
        extra = {"mode": "fwd", "series": "a"}
        rows = [Row("base", "n", x, "time", "ms", 2.0, extra=extra),
                Row("base", "n", x, "speedup", "x", 1.0, extra={**extra, "baseline": "base"})]
        if not ours_ok:
            return rows + [Row("ours", "n", x, "time", "ms", status="oom", extra=extra)]
        return rows + [Row("ours", "n", x, "time", "ms", 0.5, extra=extra),
                       Row("ours", "n", x, "speedup", "x", 4.0, extra={**extra, "baseline": "base"})]
    outcome = evaluate(claim, [(Path("r.json"), rec("bench", "small", point(1024, False)))])
    assert (outcome.status, outcome.value) == ("not reproduced", None)
    assert "ours failed at all 1 of the claim's points (out of memory or an error)" in outcome.detail
    outcome = evaluate(claim, [(Path("r.json"), rec("bench", "small", point(1024, True) + point(2048, False)))])
    assert (outcome.status, outcome.value, outcome.detail) == ("reproduced", 4.0, "ours, mean of 1; 1 more failed")


GOOD_CLAIM = {"id": "c", "claim": "x", "value": 5, "unit": "x", "higher_is_better": True, "hardware": "n/a",
              "setting": "s", "source": "s", "verified": True, "task": "kv",
              "compare": {"kind": "ratio", "metric": "speedup", "providers": ["ours"]}}


@pytest.mark.parametrize("change, message", [
    ({"higher_is_better": "maybe"}, r"higher_is_better='maybe' is not true or false"),
    ({"verified": "false"}, r"verified='false' is not true or false"),
    ({"value": "ten"}, r"value='ten' is not a number"),
    ({"compare": {"kind": "ratio", "metric": "speedup", "providers": ["ours"], "tolerance": "ten"}},
     r"compare.tolerance='ten' is not a number"),
    ({"compare": {"kind": "ratio", "metric": "speedup", "providers": ["ours"], "where": [1, 2]}},
     r"compare.where=\[1, 2\] must map"),
    ({"compare": {"kind": "ratio", "metric": "speedup", "providers": ["ours"], "comparable_at": "huge"}},
     r"comparable_at has \['huge'\]"),
    ({"compare": "ratio"}, r"compare='ratio' must be a mapping"),
    ({"hardware": 100}, r"hardware=100 is not a string"),
    ({"compare": {"kind": "ratio", "metric": "speedup", "providers": []}},
     r"compare.providers=\[\] must be a name or a non-empty list of names"),
    ({"compare": {"kind": "ratio", "metric": "speedup", "providers": 5}}, r"compare.providers=5 must be a name"),
    ({"compare": {"kind": "ratio", "metric": "speedup", "providers": ["ours"], "comparable_at": []}},
     r"compare.comparable_at=\[\] must be"),
    ({"compare": {"kind": "ratio", "metric": "speedup", "providers": ["ours"], "tolerance": -0.1}},
     r"compare.tolerance=-0.1 must be >= 0"),
    ({"compare": {"kind": "ratio", "metric": "speedup", "providers": ["ours"], "two_sided": "yes"}},
     r"compare.two_sided='yes' is not true or false"),
    ({"compare": {"kind": "ratio", "metric": "speedup", "providers": ["ours"], "aggregate": "largest_x_within",
                  "quality": {"reference": ["full"], "tolerance": 0.02, "higher_is_better": True}}},
     r"compare.quality.reference=\['full'\] is not a provider's name"),
    ({"compare": {"kind": "ratio", "metric": "speedup", "providers": ["ours"], "aggregate": "median"}},
     r"compare.aggregate='median' is not one of"),  # was no test: the report's KeyError, at judging time
    ({"compare": {"kind": "ratio", "metric": "speedup", "providers": ["ours"], "aggregate": "largest_x_within",
                  "quality": {"reference": "full", "tolerance": -0.02, "higher_is_better": True}}},
     r"compare.quality.tolerance=-0.02 must be >= 0"),
])
def test_a_bad_claim_is_refused_naming_its_key(change, message):
    from repro.claims import _parse_claim

    with pytest.raises(ValueError, match=message):
        _parse_claim("toy", "toy.yaml: claims[0]", {**GOOD_CLAIM, **change})
    scale = {**GOOD_CLAIM["compare"], "comparable_at": "paper"}  # one scale may be named bare
    assert _parse_claim("toy", "c", {**GOOD_CLAIM, "compare": scale}).compare.comparable_at == ("paper",)


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_an_exact_figure_is_missed_far_on_either_side(higher_is_better):
    """A two-sided claim (a parameter count, a cache size) fails far above as well as far below; a one-sided
    one only on its worse side."""
    from repro.claims import _parse_claim
    from repro.report import judge

    sign = 1 if higher_is_better else -1
    raw = {**GOOD_CLAIM, "value": 100, "higher_is_better": higher_is_better,
           "compare": {**GOOD_CLAIM["compare"], "tolerance": 0.05}}
    one_sided = _parse_claim("toy", "c", raw)
    two_sided = _parse_claim("toy", "c", {**raw, "compare": {**raw["compare"], "two_sided": True}})
    for value, one, two in ((100, "reproduced", "reproduced"), (100 + sign * 4, "reproduced", "reproduced"),
                            (100 + sign * 6, "reproduced", "not reproduced"),
                            (100 - sign * 4, "within tolerance", "within tolerance"),
                            (100 - sign * 6, "not reproduced", "not reproduced")):
        assert (judge(one_sided, value), judge(two_sided, value)) == (one, two), value


def test_a_claims_file_without_a_list_of_claims_is_refused(tmp_path):
    (tmp_path / "toy.yaml").write_text("paper: toy\ntitle: t\n")
    with pytest.raises(ValueError, match="'claims' must be a list"):
        load_paper(tmp_path / "toy.yaml")
    (tmp_path / "toy.yaml").write_text("paper: other\nclaims: []\n")  # its claims would be filed under another paper
    with pytest.raises(ValueError, match="top-level key 'paper' must equal the file name 'toy'"):
        load_paper(tmp_path / "toy.yaml")
    (tmp_path / "toy.yaml").write_text("paper: toy\nclaims: ['a claim as a string']\n")
    with pytest.raises(ValueError, match=r"claims\[0\]='a claim as a string' must be a mapping"):
        load_paper(tmp_path / "toy.yaml")
