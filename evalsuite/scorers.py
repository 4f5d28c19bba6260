"""Scorers for generated answers: score(generation text, doc) -> {metric: 0.0..1.0}.

A generation task names its scorer in task.yaml (`scorer: gsm8k`, the SCORERS table at the end);
the metrics a spec lists must be among the scorer's `metrics`. A scorer's `answer(text)` gives, per
metric, the extracted and normalised answer that the metric compares: with several samples per
prompt, maj@n votes on it. A code scorer's `program(text, doc)` is the sample to execute.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import itertools
import re
import string
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from .execution import Program

INVALID = "[invalid]"  # the answer of a generation from which nothing could be extracted

# GSM8K, as lm-evaluation-harness's gsm8k task scores it: the reference is the number after "####";
# "strict" reads the number after "#### " in the generation (the format the exemplars teach),
# "flexible" takes the last number-like span anywhere in it. Both sides then drop commas, "$" and a
# trailing period before an exact string comparison.
_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _gsm8k_clean(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "")
    return s[:-1] if s.endswith(".") else s


def gsm8k_reference(answer: str) -> str:
    return _gsm8k_clean(answer.split("####")[-1])


def gsm8k_extract(text: str) -> dict[str, str]:
    strict = _GSM8K_STRICT.search(text)
    spans = [a or b for a, b in _GSM8K_FLEXIBLE.findall(text)]
    return {"strict": _gsm8k_clean(strict.group(1)) if strict else INVALID,
            "flexible": _gsm8k_clean(spans[-1]) if spans else INVALID}


def gsm8k(text: str, doc: dict[str, Any]) -> dict[str, float]:
    ref = gsm8k_reference(doc["answer"])
    got = gsm8k_extract(text)
    return {"exact_match_strict": float(got["strict"] == ref), "exact_match_flexible": float(got["flexible"] == ref)}


# Short-answer QA (Natural Questions open, TriviaQA): the official SQuAD/TriviaQA answer normalisation
# (lower case, punctuation removed, articles a/an/the removed, whitespace collapsed), then exact match
# against any of the reference answers.
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"‘", "’", "´", "`", "“", "”"}


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_any(text: str, references: list[str]) -> float:
    got = normalize_answer(text)
    return float(any(got == normalize_answer(r) for r in references))


def nq_open(text: str, doc: dict[str, Any]) -> dict[str, float]:
    return {"exact_match": exact_match_any(text, doc["answer"])}


def triviaqa(text: str, doc: dict[str, Any]) -> dict[str, float]:
    return {"exact_match": exact_match_any(text, doc["answer"]["aliases"])}


# BBH with chain of thought (Suzgun et al. 2022): the answer is what follows the last "the answer is"
# in the generation, without a final period, compared exactly with the target.
_BBH_ANSWER = re.compile(r"the answer is ", re.IGNORECASE)


def bbh_extract(text: str) -> str:
    found = list(_BBH_ANSWER.finditer(text))
    if not found:
        return INVALID
    ans = text[found[-1].end():].split("\n", 1)[0].strip()
    return ans[:-1].strip() if ans.endswith(".") else ans


def bbh(text: str, doc: dict[str, Any]) -> dict[str, float]:
    return {"exact_match": float(bbh_extract(text) == doc["target"].strip())}


# DROP (Dua et al. 2019), the official answer comparison: an answer is a bag of spans; each span is
# lower-cased, split on spaces and hyphens, punctuation removed (except from numbers), numbers
# rewritten as floats ("2.0" == "2"), articles removed. EM: the same normalised spans. F1: spans
# aligned one-to-one to maximise the summed bag-of-words F1 (a pair scores 0 when the gold span has
# numbers and the predicted span shares none), averaged over the larger number of spans, rounded to
# 2 places. The score of a question is the best over its gold answers.
def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _drop_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = "".join(ch for ch in token if ch not in string.punctuation)
    if _is_number(token):
        token = str(float(token))
    return " ".join(_ARTICLES.sub(" ", token).split())


def drop_normalize(span: str) -> str:
    return " ".join(p for p in (_drop_token(t) for t in re.split(" |-", span)) if p.strip()).strip()


def _bag_f1(pred: set[str], gold: set[str]) -> float:
    common = len(pred & gold)
    precision = common / len(pred) if pred else 1.0
    recall = common / len(gold) if gold else 1.0
    return 0.0 if precision == 0.0 and recall == 0.0 else 2 * precision * recall / (precision + recall)


def _numbers_agree(gold: set[str], pred: set[str]) -> bool:
    gold_numbers = {w for w in gold if _is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in pred if _is_number(w)})


def drop_em_f1(predicted: list[str], gold: list[str]) -> tuple[float, float]:
    p_norm, g_norm = [drop_normalize(x) for x in predicted], [drop_normalize(x) for x in gold]
    em = float(sorted(set(p_norm)) == sorted(set(g_norm)) and len(p_norm) == len(g_norm))
    p_bags, g_bags = [set(x.split()) for x in p_norm], [set(x.split()) for x in g_norm]
    pair = [[_bag_f1(p, g) if _numbers_agree(g, p) else 0.0 for p in p_bags] for g in g_bags]
    # Best one-to-one alignment; answers have a handful of spans, so trying every assignment is cheap.
    small, large = (len(g_bags), len(p_bags))
    best = 0.0
    if small <= large:
        for perm in itertools.permutations(range(large), small):
            best = max(best, sum(pair[g][p] for g, p in enumerate(perm)))
    else:
        for perm in itertools.permutations(range(small), large):
            best = max(best, sum(pair[g][p] for p, g in enumerate(perm)))
    return em, round(best / max(len(g_bags), len(p_bags)), 2)


def drop_golds(doc: dict[str, Any]) -> list[list[str]]:
    """The accepted answers, each a list of spans: the hub's `answers_spans`, or the local simple-evals
    copy's `ref_text` (alternatives joined by "|", each one string; blanks of empty date fields dropped)."""
    if "answers_spans" in doc:
        return [list(doc["answers_spans"]["spans"])]
    return [[" ".join(alt.split())] for alt in doc["ref_text"].split("|")]


def drop(text: str, doc: dict[str, Any]) -> dict[str, float]:
    golds = drop_golds(doc)
    scores = [drop_em_f1([text.strip()], g) for g in golds if g]
    return {"exact_match": max(s[0] for s in scores), "f1": max(s[1] for s in scores)}


# MATH with the Minerva protocol (Lewkowycz et al. 2022): the answer is what follows the last
# "final answer is" (else the last \boxed{...}), normalised by Minerva's normalize_final_answer
# (units and filler words removed, \text/\boxed unwrapped, TeX shorthand \frac12 -> \frac{1}{2},
# "$" dropped, thousands separators dropped from integers), then compared as strings.
_MINERVA_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""),
                          ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_MINERVA_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
                    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
                    "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}",
                    "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
                    r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots"]


def minerva_normalize(answer: str) -> str:
    answer = answer.split("=")[-1]
    for before, after in _MINERVA_SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _MINERVA_REMOVED:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


_FINAL_ANSWER = re.compile(r"final answer is", re.IGNORECASE)


def math_extract(text: str) -> str:
    found = list(_FINAL_ANSWER.finditer(text))
    if found:
        ans = text[found[-1].end():].split("I hope it is correct")[0].split("\n")[0].strip()
        ans = ans[:-1].strip() if ans.endswith(".") else ans
    else:
        ans = last_boxed(text)
        if ans is None:
            return INVALID
    return minerva_normalize(ans)


def math(text: str, doc: dict[str, Any]) -> dict[str, float]:
    return {"exact_match": float(math_extract(text) == minerva_normalize(doc["answer"]))}


# Code (HumanEval, MBPP): a scorer's program(text, doc) is the sample to execute: the candidate's
# code for the sandbox and the task's tests for the judge (evalsuite.execution); the scorer reads the
# verdict.
def humaneval_program(completion: str, doc: dict[str, Any]) -> Program:
    """The prompt (signature, docstring, helpers) with the completed body runs in the sandbox; the
    judge runs the prompt too (its helpers, e.g. poly() or encode_cyclic(), are what the tests call:
    the candidate's copies could be rewritten), then check(<entry point>) against the candidate's."""
    return Program(candidate=doc["prompt"] + completion, prelude=doc["prompt"], remote=(doc["entry_point"],),
                   test=f"{doc['test']}\n\ncheck({doc['entry_point']})\n")


def mbpp_program(code: str, doc: dict[str, Any]) -> Program:
    """The generated code runs in the sandbox, followed by the item's setup code (the one item that
    has any builds objects of a class the solution defines: its names are passed by reference); the
    judge runs the three asserts. The names they call that the candidate provides: every non-builtin
    name, and builtins that the reference solution redefines (MBPP 126 defines sum)."""
    test = "\n".join(doc["test_list"]) + "\n"
    setup = doc["test_setup_code"]
    refs = {t.id for node in ast.parse(setup).body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)}
    called = {n.id for n in ast.walk(ast.parse(test)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    with warnings.catch_warnings():  # invalid escape sequences in some reference solutions
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(doc["code"])
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    # A module the asserts use that the solution imported (MBPP 596: sys.getsizeof): the judge imports its own.
    modules = sorted((called & sys.stdlib_module_names) - functions - classes)
    remote = (called - set(dir(builtins)) - refs - set(modules)) | (called & functions)
    unjudgeable = ""
    if called & classes:  # MBPP 601: the asserts build objects of the solution's class Pair
        unjudgeable = (f"the tests construct objects of the solution's class {', '.join(sorted(called & classes))}, "
                       "which cannot cross to the judge as plain data; this item cannot be judged")
    return Program(candidate=code, test=test, remote=tuple(sorted(remote)), setup=setup, refs=tuple(sorted(refs)),
                   prelude="".join(f"import {m}\n" for m in modules), unjudgeable=unjudgeable)


def code_passed(text: str, doc: dict[str, Any], outcome) -> dict[str, float]:
    """pass@1 of one sample: whether its program ran to the end in the sandbox."""
    return {"pass@1": float(outcome.passed)}


class CannotScore(RuntimeError):
    """A scorer that cannot judge this answer here (a checker's resource is missing): the item is
    recorded but not scored, never counted wrong."""


# IFEval (Zhou et al. 2023): the official instruction checkers, as lm-evaluation-harness carries them
# (its port of google-research/instruction_following_eval: the checker classes, the strict and the
# loose test). Strict: each instruction's checker on the response; loose: on the response, and with its
# first line, last line, and/or markdown asterisks removed (any variant passing passes). Prompt level:
# every instruction followed; instruction level (ratios): followed instructions over all instructions.
def ifeval(text: str, doc: dict[str, Any]) -> dict[str, float]:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from lm_eval.tasks.ifeval import utils as checkers  # it reports an nltk fetch at import, even a failed one
    except ImportError as e:
        raise CannotScore(f"IFEval's checkers need `pip install evalsuite[ifeval]` ({e})") from None
    kwargs = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in doc["kwargs"]]
    try:
        got = checkers.process_results({**doc, "kwargs": kwargs}, [text])
    except LookupError as e:  # nltk's punkt model (sentences, words), fetched on first use, is unavailable offline
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip().strip("*")]
        what = next((ln for ln in lines if ln.startswith("Resource")), lines[0] if lines else "LookupError")
        raise CannotScore(f"an IFEval checker lacks nltk data ({what}); nltk fetches it on first use where the "
                          "network is reachable (nltk.download('punkt_tab'))") from None
    return {"prompt_level_strict": float(got["prompt_level_strict_acc"]),
            "prompt_level_loose": float(got["prompt_level_loose_acc"]),
            "instructions": float(len(doc["instruction_id_list"])),
            "followed_strict": float(sum(got["inst_level_strict_acc"])),
            "followed_loose": float(sum(got["inst_level_loose_acc"]))}


@dataclass(frozen=True)
class Scorer:
    """How a generate task's answers are scored; a task names one (`scorer: gsm8k`) and lists
    metrics among its `metrics`."""
    score: Callable[..., dict[str, float]]  # (text, doc) -> {metric: 0.0..1.0}; code: (text, doc, outcome)
    metrics: tuple[str, ...]
    answer: Callable[[str], dict[str, str]] | None = None  # per metric, the extracted answer maj@n votes on
    program: Callable[[str, dict[str, Any]], Program] | None = None  # code tasks: the sample to execute
    continuous: tuple[str, ...] = ()  # metrics that are not pass/fail (no pass@k for them)
    ratios: dict[str, tuple[str, str]] = field(default_factory=dict)  # metric -> (sum over items) / (sum over items)


SCORERS: dict[str, Scorer] = {
    "gsm8k": Scorer(gsm8k, ("exact_match_strict", "exact_match_flexible"),
                    answer=lambda text: {f"exact_match_{k}": v for k, v in gsm8k_extract(text).items()}),
    "nq_open": Scorer(nq_open, ("exact_match",), answer=lambda text: {"exact_match": normalize_answer(text)}),
    "triviaqa": Scorer(triviaqa, ("exact_match",), answer=lambda text: {"exact_match": normalize_answer(text)}),
    "bbh": Scorer(bbh, ("exact_match",), answer=lambda text: {"exact_match": bbh_extract(text)}),
    "drop": Scorer(drop, ("exact_match", "f1"), continuous=("f1",),
                   answer=lambda text: dict.fromkeys(("exact_match", "f1"), drop_normalize(text.strip()))),
    "math": Scorer(math, ("exact_match",), answer=lambda text: {"exact_match": math_extract(text)}),
    "humaneval": Scorer(code_passed, ("pass@1",), program=humaneval_program),
    "mbpp": Scorer(code_passed, ("pass@1",), program=mbpp_program),
    "ifeval": Scorer(ifeval, ("prompt_level_strict", "inst_level_strict", "prompt_level_loose", "inst_level_loose"),
                     continuous=("instructions", "followed_strict", "followed_loose"),
                     ratios={"inst_level_strict": ("followed_strict", "instructions"),
                             "inst_level_loose": ("followed_loose", "instructions")}),
}
