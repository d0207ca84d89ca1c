"""One typed, frozen config per command (eval, attack, certify, uap fit, uap eval, prepare); FinetuneConfig is in
``finetune.config``. Each field declares its option once (:mod:`clipguard.config`): the CLI options, suite cells,
records and hashes all read it. Construction parses and checks every option, so tasks never re-validate.

No torch import at module level: the checks that need a registry (attack names, surrogates) import it when a config
is built, which is when a command runs, never at ``--help``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from clipguard.config import (
    ATTACK,
    CHECK,
    MODEL_DATA,
    OUTPUT,
    PERF,
    SMOOTHING,
    Config,
    choice,
    comma_list,
    from_options,
    in_range,
    input_path,
    non_negative,
    option,
    output_dir,
    output_file,
    pixel_float,
    pixel_units,
    positive,
    radius_list,
)
from clipguard.config import (
    given as changed_from_default,
)
from clipguard.errors import ClipguardError
from clipguard.run_options import RunOptions
from clipguard.specs import Eps, Norm, check_linf_eps, parse_eps, parse_norm

RESOLUTIONS = ("model", "native")  # where a perturbation lives: the model's input size or the dataset's own
ATTACK_PRECISIONS = ("fp32", "bf16", "fp16")


def _norm(value, name: str) -> Norm:
    return parse_norm(choice("linf", "l2")(value, name))


def same(cls, name: str, **changes):
    """Field ``name`` of config ``cls`` again, with another default or help (a command that shares an option)."""
    f = cls.__dataclass_fields__[name]
    opt = dataclasses.replace(f.metadata["opt"], **{k: v for k, v in changes.items() if k != "default"})
    return field(default=changes.get("default", f.default), metadata={"opt": opt})


DEFENSE_ATTACKS = ("adaptive", "non-adaptive")  # how a defended classifier is attacked: defenses.adaptive


@dataclass(frozen=True)
class DefenseOptions(Config):
    """A test-time defense in front of the classifier (eval, attack, certify; bench cells too). Every field is
    omitted from records and hashes at its default, so runs made before defenses keep their hashes."""

    defense: str | None = option(None, panel=ATTACK, metavar="NAME", parse=lambda v, n: str(v).strip().lower(),
                                 omit_at_default=True,
                                 help="Test-time defense wrapping the classifier: ttc (Xing et al. 2025's test-time "
                                      "counterattacks). Clean and robust accuracy are the defended classifier's.")
    defense_attack: str = option("adaptive", panel=ATTACK, parse=choice(*DEFENSE_ATTACKS), omit_at_default=True,
                                 help="adaptive (attacks go through the whole defense: gradients through its steps, "
                                      "EOT over its randomness) or non-adaptive (crafted on the undefended classifier, "
                                      "the papers' weaker protocol; the record and report say so).")
    defense_eot: int | None = option(None, panel=ATTACK, parse=positive, omit_at_default=True, metavar="N",
                                     help="Adaptive attacks: draws of a randomized defense averaged per gradient (EOT; "
                                          "default 4 for PGD/FGSM/APGD; AutoAttack runs its version rand, 20 draws).")
    ttc_eps: Eps = option("4/255", panel=ATTACK, parse=pixel_units(allow_zero=False), metavar="EPS",
                          omit_at_default=True, help="TTC counterattack radius, L-inf, [0, 1] pixel units (paper: "
                                                     "4/255).")
    ttc_steps: int = option(2, panel=ATTACK, parse=non_negative, omit_at_default=True,
                            help="TTC counterattack steps (paper: 2; 0: the random start alone).")
    ttc_alpha: Eps = option("1/255", panel=ATTACK, parse=pixel_units(allow_zero=False), metavar="EPS",
                            omit_at_default=True, help="TTC step size in [0, 1] pixel units (paper: 1/255).")
    ttc_tau: float = option(0.2, panel=ATTACK, parse=in_range(0, None, "a number >= 0 (the paper's tau threshold: "
                                                                       "0.2)"),
                            omit_at_default=True, metavar="TAU",
                            help="TTC tau threshold: images whose embedding moves less than this share under the "
                                 "random start are counterattacked (paper: 0.2).")
    ttc_beta: float = option(2.0, panel=ATTACK, parse=in_range(0, None, "a number >= 0 (the paper's beta: 2)"),
                             omit_at_default=True, metavar="BETA",
                             help="TTC weight of later steps: softmax(beta * step) (paper: 2).")

    OPTIONS: ClassVar[tuple[str, ...]] = ("defense_attack", "defense_eot", "ttc_eps", "ttc_steps", "ttc_alpha",
                                          "ttc_tau", "ttc_beta")

    def check(self) -> None:
        if not self.defense:
            unused = changed_from_default(self, self.OPTIONS)
            if unused:
                one = len(unused) == 1
                raise ClipguardError(f"{', '.join(unused)} {'is' if one else 'are'} used only with --defense (e.g. "
                                     f"--defense ttc): add --defense, or leave {'it' if one else 'them'} out")
            return
        from clipguard.defenses.registry import DEFENSES  # torch: only when a config is built

        DEFENSES.check(self.defense)
        check_linf_eps(self.ttc_eps, "--ttc-eps")
        check_linf_eps(self.ttc_alpha, "--ttc-alpha")
        if self.defense_eot is not None and self.defense_attack == "non-adaptive":
            raise ClipguardError(f"--defense-eot {self.defense_eot} averages the defense's randomness in an adaptive "
                                 "attack; --defense-attack non-adaptive never attacks the defense: drop one")


@dataclass(frozen=True)
class AttackOptions(Config):
    """The attack block of ``eval`` and ``attack``: an attack, its threat model and its settings."""

    attack: str | None = option(None, panel=ATTACK, metavar="NAME", parse=lambda v, n: str(v).strip().lower(),
                                help="Attack: fgsm, pgd, apgd (torchattacks) or autoattack (the reference AutoAttack, "
                                     "pyautoattack).")
    eps: tuple[Eps, ...] = option("8/255", panel=ATTACK, parse=radius_list, metavar="EPS",
                                  help="Radius in pixel units ([0, 1] per pixel): linf: per pixel, 8/255 or 0.0314, "
                                       "at most 1; l2: the image's L2 norm, e.g. 0.5 or 3 (may exceed 1); a comma "
                                       "list (0,2/255,4/255,8/255) gives a sweep.")
    norm: Norm = option("linf", panel=ATTACK, parse=_norm, metavar="NORM", help="Threat model: linf or l2.")
    alpha: Eps | None = option(None, panel=ATTACK, parse=pixel_units(allow_zero=False, upper=None), metavar="EPS",
                               help="PGD step size in pixel units, in --norm's measure (default eps/4; PGD only).")
    steps: int | None = option(None, panel=ATTACK, parse=positive,
                               help="Iterations (PGD: default 10, APGD: default 100; FGSM and AutoAttack take none).")
    restarts: int | None = option(None, panel=ATTACK, parse=positive,
                                  help="Random restarts (PGD, APGD; default 1); worst case over restarts.")
    aa_version: str | None = option(None, panel=ATTACK, metavar="VERSION",
                                    help="AutoAttack version: standard (default: APGD-CE, APGD-T, FAB-T, Square, 100 "
                                         "iterations), plus, rand or custom.")
    aa_attacks: tuple[str, ...] | None = option(None, panel=ATTACK, parse=comma_list, metavar="LIST",
                                                help="AutoAttack custom: comma list of apgd-ce, apgd-dlr, fab, square, "
                                                     "apgd-t, fab-t (e.g. apgd-ce,apgd-t as FARE).")
    resolution: str = option("model", panel=ATTACK, parse=choice(*RESOLUTIONS),
                             help="Where the perturbation lives: model (the model's input size, as TeCoA/FARE) or "
                                  "native (the dataset's own size); a transfer --surrogate always crafts at native.")
    surrogate: str | None = option(None, panel=ATTACK, metavar="SPEC",
                                   help="Transfer attack: craft on toy-cnn, clip:ARCH:TAG, clip:toy@seed1, "
                                        "hub:OWNER/REPO:ENTRY or a TorchScript file.")
    attack_precision: str = option("fp32", panel=PERF, parse=choice(*ATTACK_PRECISIONS),
                                   help="Attack precision: fp32 (default), bf16 or fp16 (weaker small-eps "
                                        "gradients: recorded as a warning, and checked against fp32 on 256 images, "
                                        "within 0.5 points).")

    # options that mean something only when an attack runs (--resolution also places the clean images)
    ATTACK_ONLY: ClassVar[tuple[str, ...]] = ("eps", "norm", "alpha", "steps", "restarts", "aa_version", "aa_attacks",
                                              "surrogate", "attack_precision")

    def check(self) -> None:
        if not self.attack:
            unused = changed_from_default(self, self.ATTACK_ONLY)
            if unused:
                one = len(unused) == 1
                raise ClipguardError(f"{', '.join(unused)} {'is' if one else 'are'} used only with --attack (e.g. "
                                     f"--attack pgd): add --attack, or leave {'it' if one else 'them'} out")
            return
        if self.norm == "linf":
            for e in self.eps:
                check_linf_eps(e)
            if self.alpha is not None:
                check_linf_eps(self.alpha, "--alpha")
        from clipguard.attacks.registry import ATTACKS, USES, check_attack  # torch: only when a config is built

        ATTACKS.check(self.attack)
        for name in ("alpha", "steps", "restarts", "aa_version", "aa_attacks"):
            if getattr(self, name) is not None and name not in USES[self.attack]:
                uses = ", ".join(f"--{u.replace('_', '-')}" for u in sorted(USES[self.attack] - {"eps"}))
                raise ClipguardError(f"--{name.replace('_', '-')} is not used by --attack {self.attack} (it takes "
                                     f"{uses}): leave it out")
        check_attack(self.attack_settings())
        if self.surrogate:
            from clipguard.attacks.surrogates import check_surrogate_spec  # torch: only when a config is built

            check_surrogate_spec(self.surrogate, trust_remote_code=self.run.trust_remote_code)
        guard = getattr(self, "defended", None)
        if self.surrogate and guard is not None and guard.defense:
            raise ClipguardError(f"--surrogate with --defense {guard.defense}: a transfer attack never sees the "
                                 "defense; attack it adaptively (drop --surrogate) or with --defense-attack "
                                 "non-adaptive")

    def attack_settings(self):
        """The attack as :class:`clipguard.attacks.registry.AttackConfig`, at the first eps (a sweep replaces it)."""
        from clipguard.attacks.registry import DEFAULT_STEPS, AttackConfig  # torch: only when a config is built

        return AttackConfig(self.attack, eps=self.eps[0], alpha=self.alpha,
                            steps=self.steps if self.steps is not None else DEFAULT_STEPS.get(self.attack, 1),
                            restarts=self.restarts if self.restarts is not None else 1, seed=self.run.seed,
                            norm=self.norm, aa_version=self.aa_version or "standard", aa_attacks=self.aa_attacks)


@dataclass(frozen=True)
class EvalConfig(AttackOptions):
    """``clipguard eval``: clean zero-shot accuracy; robust accuracy too with ``attack``."""

    run: RunOptions = field(default_factory=RunOptions)
    defended: DefenseOptions = field(default_factory=DefenseOptions)  # --defense and its options, inlined
    sanity: bool = option(False, panel=ATTACK,
                          help="Also run the costly sanity checks (eps sweep monotone, PGD vs FGSM, doubled steps, 5 "
                               "restarts).")
    adv_set: Path | None = option(None, panel=ATTACK, parse=input_path, metavar="FILE",
                                  help="Evaluate on a saved adversarial set (from `clipguard attack`) instead of "
                                       "attacking.")
    predictions: Path | None = option(None, panel=OUTPUT, parse=output_file, metavar="FILE",
                                      help="Write per-image results (digest, label, clean and adversarial predictions "
                                           "per eps) to this .csv or .parquet.")

    ATTACK_ONLY = (*AttackOptions.ATTACK_ONLY, "sanity")

    def check(self) -> None:
        if self.attack and self.adv_set:
            raise ClipguardError("--attack and --adv-set exclude each other: attack now, or evaluate a saved set")
        super().check()
        if self.sanity and self.attack == "fgsm" and len(self.eps) < 2:
            # its checks compare with FGSM (itself), double the steps and restart (it has neither): only the sweep's
            raise ClipguardError("--sanity with --attack fgsm has only the monotone-sweep check, which needs two or "
                                 "more eps (e.g. --eps 0,4/255,8/255); or use --attack pgd for every check")


def _attack_run() -> RunOptions:
    return RunOptions(batch_size=128)


@dataclass(frozen=True)
class AttackSetConfig(AttackOptions):
    """``clipguard attack``: craft one adversarial set (one eps) and save it for ``eval --adv-set``."""

    attack: str | None = same(AttackOptions, "attack", default="pgd")
    eps: tuple[Eps, ...] = same(AttackOptions, "eps", help="Radius in [0, 1] pixel units (8/255 or 0.0314); one "
                                                           "value.")
    run: RunOptions = field(default_factory=_attack_run)
    defended: DefenseOptions = field(default_factory=DefenseOptions)  # --defense and its options, inlined
    adv_set: Path = option(None, panel=OUTPUT, parse=output_file, metavar="FILE",
                           help="Adversarial set to write (.safetensors), for `eval --adv-set`.")
    quantize: bool = option(False, panel=OUTPUT, help="Store uint8 pixels (k/255), clipped to stay within eps.")
    png: Path | None = option(None, panel=OUTPUT, parse=output_dir, metavar="DIR",
                              help="Write picture grids (clean | perturbation | adversarial) to this folder.")

    def check(self) -> None:
        if self.adv_set is None:
            raise ClipguardError("give --adv-set FILE.safetensors: where to write the adversarial set")
        if len(self.eps) > 1:
            raise ClipguardError(f"--eps {','.join(e.text for e in self.eps)!r}: attack crafts one set, give one eps "
                                 "(sweeps are for `eval`)")
        if not self.attack:
            raise ClipguardError("--attack is required: fgsm, pgd, apgd or autoattack")
        if self.quantize and self.norm != "linf":
            raise ClipguardError("--quantize rounds within an L-inf ball; with --norm l2 rounding can leave the L2 "
                                 "ball, so it is not offered: save the float set (drop --quantize)")
        super().check()


def _radii(value, name: str) -> tuple[float, ...]:
    """``"0,0.25,0.5"`` -> sorted distinct L2 radii >= 0 ([0, 1] pixel units)."""
    if isinstance(value, tuple):
        return value
    radii = tuple(sorted({parse_eps(r.strip(), name=name, upper=None).value for r in str(value).split(",")
                          if r.strip()}))  # L2 radii may exceed 1; fractions (1/255) work as everywhere
    if not radii:
        raise ClipguardError(f"{name} {value!r}: use a comma list of L2 radii >= 0 in [0, 1] pixel units, "
                             "e.g. 0,0.25,0.5,1")
    return radii


_radii.takes_text = True


def _radii_text(radii: tuple[float, ...]) -> str:
    return ",".join(f"{r:g}" for r in radii)


@dataclass(frozen=True)
class CertifyConfig(Config):
    """``clipguard certify``: certified L2 accuracy of the Gaussian-smoothed classifier (Cohen et al.)."""

    EXCLUDE = ("batch_size",)

    run: RunOptions = field(default_factory=RunOptions)
    defended: DefenseOptions = field(default_factory=DefenseOptions)  # --defense: the smoothed classifier is defended
    sigma: float = option(0.25, panel=SMOOTHING, parse=pixel_float(allow_zero=False),
                          metavar="STD",
                          help="Noise std in [0, 1] pixel units at the model's input size (Cohen et al.: 0.12, 0.25, "
                               "0.5, 1.0).")
    n0: int = option(100, panel=SMOOTHING, parse=positive, help="Selection samples per image.")
    n: int = option(100_000, panel=SMOOTHING, parse=positive,
                    help="Estimation samples per image (Cohen et al.: 100000).")
    failure_prob: float = option(0.001, panel=SMOOTHING, metavar="P",
                                 parse=in_range(0, 0.5, "in (0, 0.5): each certificate's failure probability "
                                                         "(Cohen et al.'s alpha: 0.001)", lo_open=True),
                                 help="Failure probability of each certificate (Cohen et al.'s alpha; --alpha is "
                                      "PGD's step everywhere else).")
    noise_batch: int = option(1000, panel=PERF, parse=positive,
                              help="Noisy samples per forward pass (halved on GPU out-of-memory).")
    radii: tuple[float, ...] = option("0,0.25,0.5,0.75,1,1.25,1.5,1.75,2", panel=SMOOTHING, parse=_radii,
                                      dump=_radii_text, metavar="LIST",
                                      help="Certified-accuracy grid: comma list of L2 radii in pixel units (an "
                                           "image's L2 norm: may exceed 1).")
    check_images: int = option(10, panel=CHECK, parse=non_negative,
                               help="Images attacked (SmoothAdv L2 PGD) by the integrity check and for the empirical "
                                    "curve; 0 skips both (the record lists the check as skipped, checks_passed null).")
    check_steps: int = option(20, panel=CHECK, parse=positive, help="PGD iterations of the check attack.")
    check_samples: int = option(16, panel=CHECK, parse=positive, help="Noise samples per PGD step.")
    check_n: int = option(1000, panel=CHECK, parse=positive,
                          help="Noise samples re-estimating the smoothed classifier at an attacked image.")

    def check(self) -> None:
        guard = self.defended
        if guard.defense and (guard.defense_attack != "adaptive" or guard.defense_eot is not None):
            raise ClipguardError("certify smooths the defended classifier and its SmoothAdv check attacks it through "
                                 "the defense, averaging --check-samples draws: --defense-attack and --defense-eot "
                                 "apply to eval and attack only")


def _fit_run() -> RunOptions:
    return RunOptions(split="train", batch_size=128)


@dataclass(frozen=True)
class UAPFitConfig(Config):
    """``clipguard uap fit``: one universal perturbation fitted on a split (always fp32)."""

    EXCLUDE = ("precision",)
    HELP = {"split": "Dataset split to fit on."}

    run: RunOptions = field(default_factory=_fit_run)
    uap: Path | None = option(None, panel=OUTPUT, parse=output_file, metavar="FILE",
                              help="UAP file to write (.safetensors), for `uap eval --uap`.")
    eps: Eps = option("10/255", panel=ATTACK, parse=pixel_units(allow_zero=False, upper=None), metavar="EPS",
                      help="Radius of the UAP in pixel units ([0, 1] per pixel), 8/255 accepted: max |v| for linf "
                           "(at most 1), ||v||_2 for l2 (may exceed 1).")
    norm: Norm = option("linf", panel=ATTACK, parse=_norm, metavar="NORM", help="Threat model: linf or l2.")
    method: str = option("sgd", panel=ATTACK, metavar="NAME",
                         help="sgd (projected sign-gradient ascent over mini-batches, fast) or deepfool "
                              "(Moosavi-Dezfooli et al. 2017).")
    target_fooling: float = option(0.8, panel=ATTACK,
                                   parse=in_range(0, 1, "a share in (0, 1]", lo_open=True, hi_open=False),
                                   help="Stop once the fitting-set fooling rate reaches this share.")
    epochs: int = option(10, panel=ATTACK, parse=positive, help="At most this many passes over the fitting set.")
    step_size: Eps | None = option(None, panel=ATTACK, parse=pixel_units(allow_zero=False, upper=None),
                                   metavar="EPS",
                                   help="sgd step per batch in pixel units, in --norm's measure (default eps/10).")
    target_class: str | None = option(None, panel=ATTACK, metavar="CLASS",
                                      help="Targeted UAP: success = the prediction becomes this class name.")
    resolution: str = same(AttackOptions, "resolution")
    png: Path | None = option(None, panel=OUTPUT, parse=output_dir, metavar="DIR",
                              help="Write the perturbation (scaled to be visible) and a grid of clean vs perturbed "
                                   "images with their predictions to this folder.")

    def check(self) -> None:
        if self.uap is None:
            raise ClipguardError("give --uap FILE.safetensors: where to write the result")
        if self.norm == "linf":
            check_linf_eps(self.eps)
            if self.step_size is not None:
                check_linf_eps(self.step_size, "--step-size")
        self.uap_settings()

    def uap_settings(self):
        """The checked :class:`clipguard.uap.core.UAPConfig` (target class still unresolved)."""
        from clipguard.uap.core import UAPConfig  # torch: only when a config is built
        from clipguard.uap.fit import check_uap_config

        return check_uap_config(UAPConfig(eps=self.eps, norm=self.norm, method=self.method,
                                          target_fooling=self.target_fooling, epochs=self.epochs,
                                          batch_size=self.run.batch_size, step=self.step_size,
                                          resolution=self.resolution, seed=self.run.seed))


@dataclass(frozen=True)
class UAPEvalConfig(Config):
    """``clipguard uap eval``: fooling rate of a fitted UAP on any model (another one gives the transfer number)."""

    EXCLUDE = ("precision",)

    run: RunOptions = field(default_factory=RunOptions)
    uap: Path | None = option(None, panel=ATTACK, parse=input_path, metavar="FILE",
                              help="UAP file from `clipguard uap fit`.")
    allow_fit_split: bool = option(False, panel=ATTACK,
                                   help="Allow evaluating on the split the UAP was fitted on (not a held-out fooling "
                                        "rate; the record says so).")
    png: Path | None = same(UAPFitConfig, "png")

    def check(self) -> None:
        if self.uap is None:
            raise ClipguardError("give --uap FILE.safetensors: the UAP from `clipguard uap fit`")


@dataclass(frozen=True)
class PrepareConfig(Config):
    """``clipguard prepare``: a dataset decoded once into the prepared cache at the model's input size."""

    EXCLUDE = ("prompts", "templates", "adapter", "device", "precision", "data_mode", "streaming", "compile",
               "compile_mode", "confidence")
    HELP = {"model": "Model whose input size and geometry (resize mode, interpolation) the images are brought to "
                     "(only its config is read)."}

    run: RunOptions = field(default_factory=RunOptions)
    size: int | None = option(None, panel=MODEL_DATA, parse=positive, metavar="PIXELS",
                              help="Input size in pixels (square), instead of the model's.")


def eval_config(**opts) -> EvalConfig:
    """An EvalConfig from flat keyword options (a script, a test): RunOptions fields by their own names."""
    return from_options(EvalConfig, opts)


def attack_set_config(**opts) -> AttackSetConfig:
    return from_options(AttackSetConfig, opts)


def certify_config(**opts) -> CertifyConfig:
    return from_options(CertifyConfig, opts)


def uap_fit_config(**opts) -> UAPFitConfig:
    return from_options(UAPFitConfig, opts)


def uap_eval_config(**opts) -> UAPEvalConfig:
    return from_options(UAPEvalConfig, opts)


def prepare_config(**opts) -> PrepareConfig:
    return from_options(PrepareConfig, opts)


# ------------------------------------------------------------------------ suites, reports, gates, housekeeping
RAY, SLURM = "Ray (--executor ray)", "Slurm (--executor slurm)"
EXECUTOR_NAMES = ("local", "ray", "slurm")


def _existing_dir(what: str):
    def parse(value, name: str) -> Path:
        if not Path(value).is_dir():
            raise ClipguardError(f"{what} {str(value)!r} is not a folder of records")
        return Path(value)

    return parse


def _cell_ids(value, name: str) -> list[str]:
    """``--only a --only b,c`` -> [a, b, c]."""
    return list(comma_list(value, name))


_cell_ids.repeatable = True  # the CLI takes the option more than once (cli.options._cli_type)


@dataclass(frozen=True)
class BenchRunConfig(Config):
    """``clipguard bench run``: every cell of a suite whose record is missing or stale."""

    suite: Path | None = option(None, panel=MODEL_DATA, argument=True, parse=input_path, metavar="SUITE",
                                help="Suite TOML, e.g. benchmarks/toy.toml.")
    out: Path | None = option(None, panel=OUTPUT, short="-o", parse=output_dir, metavar="DIR",
                              help="Folder for records/ and adapters/.")
    only: list[str] | None = option(None, panel=MODEL_DATA, metavar="CELL", parse=_cell_ids,
                                    help="Run only these cell ids (repeatable or comma-separated; an id not in SUITE "
                                         "is refused).")
    executor: str = option("local", panel=PERF, parse=choice(*EXECUTOR_NAMES),
                           help="Who runs the cells: local (this process, in file order), ray (one Ray task per cell) "
                                "or slurm (a submitit job array per wave of independent cells).")
    ray_address: str | None = option(None, panel=RAY, metavar="ADDRESS",
                                     help="A running Ray cluster (auto, HOST:6379, ray://HOST:10001); default: start "
                                          "one on this machine.")
    cpus_per_cell: float = option(1, panel=RAY, help="CPU cores Ray reserves per cell (fractions allowed); also the "
                                                     "cell's torch threads.")
    gpus_per_cell: float | None = option(None, panel=RAY, help="GPUs per cell (0.5: two cells share a GPU); default: "
                                                               "1 when the cluster has GPUs, else 0.")
    slurm_partition: str | None = option(None, panel=SLURM, metavar="NAME",
                                         help="sbatch --partition (default: the cluster's).")
    slurm_gpus_per_task: int = option(1, panel=SLURM, help="GPUs per cell (sbatch --gpus-per-task; 0: CPU only).")
    slurm_cpus_per_task: int = option(1, panel=SLURM, parse=positive,
                                      help="CPU cores per cell (sbatch --cpus-per-task); also the cell's torch "
                                           "threads.")
    slurm_time: int = option(240, panel=SLURM, parse=positive, metavar="MINUTES",
                             help="Time limit per cell, in minutes; a timed-out cell is requeued and resumes (3 times "
                                  "at most).")
    slurm_array_parallelism: int | None = option(None, panel=SLURM, parse=positive,
                                                 help="At most this many cells of a wave running at once (default: as "
                                                      "Slurm allows).")
    submitit_cluster: str | None = option(None, panel=SLURM, parse=choice("slurm", "local"),
                                          help="submitit's backend: slurm (sbatch; the default), or local (the job "
                                               "array as processes on this machine: to try a suite, and in tests).")

    def check(self) -> None:
        if self.suite is None or self.out is None:
            raise ClipguardError("bench run needs a SUITE file and --out DIR (e.g. benchmarks/toy.toml --out runs/t)")
        stray = {"ray": {"--ray-address": self.ray_address, "--gpus-per-cell": self.gpus_per_cell},
                 "slurm": {"--slurm-partition": self.slurm_partition,
                           "--slurm-array-parallelism": self.slurm_array_parallelism,
                           "--submitit-cluster": self.submitit_cluster}}
        for owner, given in stray.items():  # an option of another executor is an error, not ignored
            for name, value in given.items():
                if value is not None and owner != self.executor:
                    raise ClipguardError(f"{name} applies to --executor {owner}, not {self.executor}")


@dataclass(frozen=True)
class ReportConfig(Config):
    """``clipguard report``: tables, curves and integrity summary from records (no recompute)."""

    records: Path | None = option(None, panel=MODEL_DATA, argument=True, parse=_existing_dir("report:"),
                                  metavar="RECORDS", help="Folder of result records (searched recursively).")
    out: Path | None = option(None, panel=OUTPUT, short="-o", parse=output_file, metavar="FILE",
                              help="Markdown report to write (default: RECORDS/report.md).")
    html: Path | None = option(None, panel=OUTPUT, parse=output_file, metavar="FILE",
                               help="Also write a self-contained HTML report.")
    csv: Path | None = option(None, panel=OUTPUT, parse=output_file, metavar="FILE",
                              help="Also write a CSV (CLIP_benchmark's columns first).")
    force: bool = option(False, panel=OUTPUT, help="Replace existing report files that clipguard did not write.")
    baseline: str | None = option(None, panel=MODEL_DATA, metavar="NAME",
                                  help="Mark the numbers that differ significantly from this model's on the same "
                                       "dataset (exact McNemar on --predictions, Holm-adjusted; ? where a run has no "
                                       "predictions).")

    def check(self) -> None:
        if self.records is None:
            raise ClipguardError("report needs RECORDS: a folder of result records (e.g. runs/bench-toy)")
        if self.out is None:  # beside the records, never the current folder (a report of another run lands there)
            object.__setattr__(self, "out", output_file(self.records / "report.md", "--out"))


@dataclass(frozen=True)
class GateConfig(Config):
    """``clipguard gate``: exit 0 when every rule holds over the records, 1 when any fails."""

    records: Path | None = option(None, panel=MODEL_DATA, argument=True, parse=_existing_dir("gate:"),
                                  metavar="RECORDS", help="Folder of result records (searched recursively), as for "
                                                          "`clipguard report`.")
    rules: Path | None = option(None, panel=MODEL_DATA, parse=input_path, metavar="FILE",
                                help="TOML with rules = [\"robust_acc(attack=pgd, eps=1/255) >= 0.40\", \"clean_acc1 "
                                     ">= 0.85\"].")
    junit: Path | None = option(None, panel=OUTPUT, parse=output_file, metavar="FILE",
                                help="Write JUnit XML for CI systems.")
    out: Path | None = option(None, panel=OUTPUT, short="-o", parse=output_file, metavar="FILE",
                              help="Write the outcomes as JSON to this file.")
    baseline: Path | None = option(None, panel=MODEL_DATA, parse=input_path, metavar="RECORDS",
                                   help="Records (a folder or one record) that `METRIC(...) >= baseline` rules compare "
                                        "with; `significant = true` pairs their --predictions with RECORDS'.")

    def check(self) -> None:
        if self.records is None or self.rules is None:
            raise ClipguardError("gate needs RECORDS and --rules FILE (e.g. clipguard gate runs/bench-toy --rules "
                                 "benchmarks/gate-toy.toml)")


STATS = "Statistics"  # compare's test and interval settings (a panel after the others)


@dataclass(frozen=True)
class CompareConfig(Config):
    """``clipguard compare``: runs on the same images, paired image by image (exact McNemar, Holm, differences)."""

    sources: list[str] | None = option(None, panel=MODEL_DATA, argument=True, metavar="RUNS",
                                       help="Two records, run folders or predictions files (.csv, .parquet) of the "
                                            "same images; a suite's folder with --baseline.")
    baseline: str | None = option(None, panel=MODEL_DATA, metavar="NAME",
                                  help="Compare every other run against the run of this model label, per dataset.")
    level: float = option(0.05, panel=STATS, parse=in_range(0, 1, "in (0, 1): the significance level alpha "
                                                                       "(e.g. 0.05)", lo_open=True),
                          metavar="ALPHA", help="Significance level of the Holm-adjusted McNemar tests; differences "
                                                "get (1 - ALPHA) intervals.")
    n_resamples: int = option(9999, panel=STATS, parse=positive,
                              help="Bootstrap resamples of each paired difference's interval (scipy's default).")
    seed: int = option(0, panel=STATS, help="Seed of the bootstrap resampling.")

    def check(self) -> None:
        if not self.sources:
            raise ClipguardError("compare needs RUNS: two records, run folders or predictions files (e.g. clipguard "
                                 "compare base.json tuned.json), or a suite's folder with --baseline NAME")


def compare_config(**opts) -> CompareConfig:
    return from_options(CompareConfig, opts)


MIN_KEY_PREFIX = 4  # hex characters of a text-embedding key `cache rm` needs (a key has 64)


@dataclass(frozen=True)
class CacheRmConfig(Config):
    """``clipguard cache rm``: cached text embeddings removed by key prefix, or all."""

    keys: list[str] | None = option(None, panel=MODEL_DATA, argument=True, metavar="KEYS",
                                    help="Key prefixes to remove.")
    all: bool = option(False, panel=MODEL_DATA, help="Remove every entry.")

    def check(self) -> None:
        if not self.keys and not self.all:
            raise ClipguardError("cache rm: name key prefixes (see `clipguard cache ls`) or pass --all")
        short = [k for k in self.keys or [] if len(k.strip()) < MIN_KEY_PREFIX]
        if short:  # "" (an unset $KEY in a script) is a prefix of every key: it would remove them all
            raise ClipguardError(f"cache rm: key prefix {short[0]!r} is shorter than {MIN_KEY_PREFIX} characters and "
                                 "could match many entries: give more of the key (`clipguard cache ls`), or pass "
                                 "--all to remove every entry")


@dataclass(frozen=True)
class CacheLsConfig(Config):
    """``clipguard cache ls``: the cached text-embedding entries (no options besides --json)."""


@dataclass(frozen=True)
class DatasetsConfig(Config):
    """``clipguard datasets``: the dataset catalogue and what is present locally."""

    suite: str | None = option(None, panel=MODEL_DATA, metavar="NAME",
                               help="Only the sets a protocol reports: tecoa, fare, shift.")
