"""The RL run's typed config: rollout, the shared policy-update knobs, the value model, and the
algorithm's own section (``policy.options``, typed by the algorithm named in ``policy.method``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tracerl.data.tasks import TaskConfig
from tracerl.errors import ConfigError
from tracerl.eval import PeriodicEvalConfig
from tracerl.generation import SamplingConfig
from tracerl.generation.seeds import check_seed_value
from tracerl.rewards import RewardConfig
from tracerl.rl.curriculum import CurriculumStage
from tracerl.rollout import check_engine
from tracerl.train.distributed import DistributedConfig
from tracerl.train.lora import LoraConfig
from tracerl.train.loop import LoopConfig
from tracerl.train.optim import OptimConfig


@dataclass
class RolloutConfig:
    num_prompts: int = 8  # problems per RL step
    group_size: int = 8  # responses per problem
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    batch_size: int = 64  # requests in flight (engine) / per generate() call (static); never changes a sample
    engine: str = "engine"  # engine (continuous batching) | static (generate() in batches); same samples

    def __post_init__(self) -> None:
        check_engine(self.engine, "rollout.engine")


TRUNCATED = ("keep", "wrong", "mask")


@dataclass
class PolicyConfig:
    method: str = "tracerl"  # the RL algorithm (registry name): tracerl, random_masking, coupled, or a plugin's
    options: dict = field(default_factory=dict)  # per algorithm, its own keys: {tracerl: {shrink: 1}} (`tracerl config rl`)
    ppo_epochs: int = 1  # passes over the step's responses
    eps: float = 0.2  # PPO clip range
    logratio_clamp: float = 10.0  # |log ratio| cap before exp
    beta: float = 0.0  # k3 KL weight
    kl_reference: str = "rollout"  # rollout (upstream: the policy that sampled) | initial (frozen copy; LoRA: the base)
    ref_model_sync_steps: int = 0  # kl_reference=initial: every N steps ref <- a*policy + (1-a)*ref (TR-DPO); 0: never
    ref_model_mixup_alpha: float = 0.6  # that a (TRL's default; 1 = copy the policy)
    normalisation: str = "token_mean"  # token_mean | upstream (1/L1 per row)
    filter_equal: bool = True  # drop groups whose rewards are all equal (they carry no signal)
    accuracy_band: list[float] | None = None  # e.g. [0.2, 0.8]: keep groups with accuracy inside
    rows_per_forward: int = 0  # cap on training rows per forward, for memory (0 = a micro-batch's rows)
    truncated: str = "keep"  # responses cut at max_new_tokens without a stop: keep (scored as they are) | wrong | mask
    truncated_reward: float = 0.0  # truncated=wrong: the reward they get (and they count as incorrect)

    def __post_init__(self) -> None:
        if self.ref_model_sync_steps < 0:
            raise ConfigError(f"policy.ref_model_sync_steps: must be >= 0 (0 = the reference stays the start), "
                              f"got {self.ref_model_sync_steps}")
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ConfigError(f"policy.ref_model_mixup_alpha: must be in (0, 1], got {self.ref_model_mixup_alpha}")
        if self.truncated not in TRUNCATED:
            raise ConfigError(f"policy.truncated: {self.truncated!r}; valid: {', '.join(TRUNCATED)} (wrong: reward "
                              f"policy.truncated_reward and incorrect; mask: left out of the loss, DAPO's overlong filter)")


@dataclass
class ValueConfig:
    enabled: bool = False  # train a diffusion value model; advantages by GAE over trace steps
    share_backbone: bool = False  # False: a separate copy of the backbone (upstream-compatible)
    gamma: float = 1.0  # GAE discount over trace steps
    lam: float = 1.0  # GAE lambda
    eps: float = 0.2  # value clipping
    lr: float = 5e-6  # value model learning rate
    train_every: int = 1  # update the value model every N RL steps (advantages every step)
    lora: LoraConfig = field(default_factory=LoraConfig)  # train LoRA adapters + the head (a backbone of its own)


@dataclass
class RLConfig:
    model: str = "tiny-block"  # preset name or checkpoint folder (the policy's start)
    output_dir: str = "runs/rl"  # checkpoints/ (policy and value-model folders), metrics.jsonl, summary.json
    max_steps: int = 20  # RL steps
    save_every: int = 0  # checkpoint every N steps (0: only the final one)
    seed: int = 0  # run seed: rollout problems, masks, base sampling seed
    resume: bool = False  # continue the latest checkpoint in output_dir
    device: str = "cpu"  # cpu, cuda, cuda:N, mps
    plugins: list[str] = field(default_factory=list)  # modules or .py files to import first (they register algorithms)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(split="train", size=256))
    reward: RewardConfig = field(default_factory=RewardConfig)  # reward functions and weights (rewards/functions.py)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    loop: LoopConfig = field(default_factory=LoopConfig)  # micro_batch = responses per micro-batch
    lora: LoraConfig = field(default_factory=LoraConfig)  # the policy trains LoRA adapters (peft), as in SFT
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
    curriculum: list[CurriculumStage] = field(default_factory=list)  # stages by step: task difficulty, response cap (rl/curriculum.py)
    fail_on_reward_error: bool = False  # a reward function that raises: 0 reward, reported (or stop)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # several ranks (torchrun)

    def __post_init__(self) -> None:
        self.seed = check_seed_value(self.seed, "seed")  # hashed as a non-negative int (generation/seeds.py)
