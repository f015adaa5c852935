"""The training-memory account against counts by hand, and against the CUDA allocator on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ncsweep.losses import CrossEntropy
from ncsweep.memory import TrainMemory, training_step_memory
from ncsweep.training import LBFGS

BATCH, IN, HIDDEN, OUT = 5, 8, 16, 4
N_PARAMS = IN * HIDDEN + HIDDEN + HIDDEN * OUT + OUT  # 212 numbers in four tensors
KEYS = ["memory_params_bytes", "memory_grads_bytes", "memory_optimizer_bytes",
        "memory_activations_bytes", "train_memory_bytes"]


def mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT)).to(dtype)


def batch(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, IN, generator=generator).to(dtype),
            torch.randint(OUT, (BATCH,), generator=generator))


def saved_by_mlp(size: int, first_layer_trains: bool = True) -> int:
    """What autograd saves for Linear-ReLU-Linear + cross-entropy, storage by storage.

    The first Linear saves its input x for its weight's gradient (only when that weight
    trains); ReLU saves its output, which is also the tensor the second Linear saves for its
    weight's gradient (one storage); log-softmax saves its output, which nll_loss saves again,
    with the int64 labels and its float total_weight scalar. The Linears' weights, saved for
    the input gradients, are parameters and not counted.
    """
    x = BATCH * IN * size if first_layer_trains else 0
    relu_out = BATCH * HIDDEN * size
    log_softmax_out = BATCH * OUT * size
    labels = BATCH * 8
    total_weight = size
    return x + relu_out + log_softmax_out + labels + total_weight


def step(model: nn.Module, optimizer: torch.optim.Optimizer,
         dtype: torch.dtype = torch.float32) -> TrainMemory:
    x, y = batch(dtype)
    return training_step_memory(model, CrossEntropy(), optimizer, x, y)


def test_adam_on_an_mlp_matches_the_count_by_hand() -> None:
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    memory = step(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    params = N_PARAMS * 4
    # two moments per parameter, and per parameter tensor a float32 'step' scalar on the CPU
    adam = 2 * params + 4 * 4
    assert memory.params_bytes == params == 848
    assert memory.grads_bytes == params
    assert memory.optimizer_bytes == adam
    assert memory.activations_bytes == saved_by_mlp(4) == 604
    assert memory.total_bytes == 2 * params + adam + 604
    assert list(memory.as_dict()) == KEYS
    assert memory.as_dict()["train_memory_bytes"] == memory.total_bytes
    assert not torch.equal(before["0.weight"], model.state_dict()["0.weight"]), "no real step"


def test_a_frozen_layer_counts_in_params_not_in_grads_nor_its_saved_input() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    memory = step(model, torch.optim.SGD(trainable, lr=0.1, momentum=0.9))
    second_layer = (HIDDEN * OUT + OUT) * 4
    assert memory.params_bytes == N_PARAMS * 4
    assert memory.grads_bytes == second_layer
    assert memory.optimizer_bytes == second_layer  # one momentum buffer each
    assert memory.activations_bytes == saved_by_mlp(4, first_layer_trains=False) == 444


def test_sgd_without_momentum_holds_no_state() -> None:
    model = mlp()
    memory = step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert memory.optimizer_bytes == 0
    assert memory.grads_bytes == memory.params_bytes == N_PARAMS * 4


def test_float64_doubles_every_figure() -> None:
    single = step(model := mlp(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    double = step(model := mlp(torch.float64),
                  torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), torch.float64)
    # the int64 labels are 8 bytes in both
    labels = BATCH * 8
    assert double.params_bytes == 2 * single.params_bytes
    assert double.grads_bytes == 2 * single.grads_bytes
    assert double.optimizer_bytes == 2 * single.optimizer_bytes
    assert double.activations_bytes - labels == 2 * (single.activations_bytes - labels)
    assert double.activations_bytes == saved_by_mlp(8)


def test_adam_step_scalars_follow_the_default_dtype_not_the_parameters() -> None:
    model = mlp(torch.float64)
    memory = step(model, torch.optim.Adam(model.parameters(), lr=1e-3), torch.float64)
    assert memory.optimizer_bytes == 2 * N_PARAMS * 8 + 4 * 4


def test_tied_parameters_count_once() -> None:
    model = mlp()
    model.append(nn.Linear(OUT, HIDDEN, bias=False))
    model.append(nn.Linear(HIDDEN, OUT, bias=False))
    model[4].weight = model[2].weight  # the same 4 x 16 parameter twice
    extra = OUT * HIDDEN * 4
    memory = step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert memory.params_bytes == N_PARAMS * 4 + extra
    assert memory.grads_bytes == N_PARAMS * 4 + extra


def test_a_weight_shared_by_view_is_one_storage() -> None:
    class Mirrored(nn.Module):
        """y = W^T (W x): autograd saves W and W.t(), one parameter storage."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(OUT, IN))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x @ self.weight.t() @ self.weight)[:, :OUT]

    model = Mirrored()
    memory = step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert memory.params_bytes == OUT * IN * 4
    # x (saved for W's gradient) and x W^T (saved for the second W's gradient); no weights
    inner = BATCH * IN * 4 + BATCH * OUT * 4
    loss = BATCH * OUT * 4 + BATCH * 8 + 4
    assert memory.activations_bytes == inner + loss


def test_batch_norm_running_statistics_are_not_activations() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Linear(HIDDEN, OUT))
    memory = step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    # Linear: x; BatchNorm: its input, saved mean and inverse std (HIDDEN each), its output
    # (the second Linear's saved input); the loss as above. Running mean/var are buffers.
    batch_norm = BATCH * HIDDEN * 4 + 2 * HIDDEN * 4 + BATCH * HIDDEN * 4
    assert memory.activations_bytes == (BATCH * IN * 4 + batch_norm
                                        + BATCH * OUT * 4 + BATCH * 8 + 4)


def test_autocast_weight_copies_count_as_activations() -> None:
    inner = mlp()

    class Autocast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.inner(x).float()

    memory = step(Autocast(), torch.optim.SGD(inner.parameters(), lr=0.1))
    # bf16: x, the ReLU output, and the second weight's copy (saved for the ReLU output's
    # gradient); then the float32 loss as above
    bf16 = 2 * (BATCH * IN + BATCH * HIDDEN + HIDDEN * OUT)
    assert memory.activations_bytes == bf16 + BATCH * OUT * 4 + BATCH * 8 + 4 == 492


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_lbfgs_runs_through_the_closure(line_search: str | None) -> None:
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    optimizer = LBFGS(model.parameters(), lr=0.1, weight_decay=5e-4, max_iter=1,
                      history_size=10, line_search_fn=line_search)
    memory = step(model, optimizer)
    # after one iteration: the direction d and the previous flat gradient, N_PARAMS each, and
    # the step length t = lr min(1, 1/||g||_1), a float32 scalar tensor here (||g||_1 > 1),
    # as is the one the strong-Wolfe search returns
    assert memory.optimizer_bytes == 2 * N_PARAMS * 4 + 4
    assert memory.activations_bytes == saved_by_mlp(4)  # one closure's graph, not the sum
    assert not torch.equal(before["2.bias"], model.state_dict()["2.bias"])


def test_penalty_adds_its_saved_tensors() -> None:
    model = mlp()
    x, y = batch()
    plain = training_step_memory(model, CrossEntropy(), torch.optim.SGD(model.parameters(), 0.1),
                                 x, y)
    model = mlp()
    hidden = model[0].weight
    penalised = training_step_memory(model, CrossEntropy(),
                                     torch.optim.SGD(model.parameters(), 0.1), x, y,
                                     penalty=lambda: (2 * hidden).pow(2).sum())
    # 2 W is made in the step and saved by pow; a scalar factor saves nothing
    assert penalised.activations_bytes == plain.activations_bytes + IN * HIDDEN * 4


@pytest.mark.gpu
def test_the_account_agrees_with_the_cuda_allocator() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the allocator's peak is the figure compared")
    from ncsweep.heads import LearnedHead
    from ncsweep.models import Network, ResNet

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Network(ResNet((3, 32, 32), 512, "resnet18", stem="cifar"),
                    LearnedHead(10, 512)).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(32, 3, 32, 32, device=device)
    y = torch.randint(10, (32,), device=device)
    training_step_memory(model, CrossEntropy(), optimizer, x, y)  # warm-up: cuDNN, state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    memory = training_step_memory(model, CrossEntropy(), optimizer, x, y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    workspace = 256 * 2**20
    assert peak >= memory.params_bytes + memory.grads_bytes + memory.optimizer_bytes
    assert peak >= memory.params_bytes + memory.activations_bytes
    assert peak <= 1.5 * memory.total_bytes + workspace, (peak, memory)
