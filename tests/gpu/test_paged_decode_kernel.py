"""The paged decode attention kernel against its gather + SDPA reference.

Rules: the interpreter must be switched on before triton is first imported, so the kernel's
check runs in a fresh process (``TRITON_INTERPRET=1``, this module run with ``-m``) on CPU
tensors: rows of lengths 1, block_size - 1, block_size and a few blocks, each with its own
shuffled blocks and arbitrary valid ids past its length; GQA, MHA and an uneven group; head
sizes 16, 64 and one that is not a power of two; a strided query as the attention function
passes it; float32 to 1e-4, float16 and bfloat16 loosely; then launch plans of one and
several splits, tiles that span or cut blocks, and empty splits; with the step's new keys
and values (strided, as the attention function passes them): the cache afterwards equal bit
for bit to ``index_copy_`` of them into each row's last slot (which held other values
before), and the output equal to the reference on that cache, for every plan and both block
sizes, and in bfloat16. Its launches take about a second each in the interpreter, the
process's imports a few more. The reference itself is checked here, in-process, against a
per-row softmax. The CUDA test is marked ``gpu`` and skipped without a device.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tests.gpu.interpreter import assert_passes_in_interpreter
from vajra.gpu.paged_decode_kernel import (
    LaunchPlan,
    available,
    launch_plan,
    paged_decode_attention,
    paged_decode_attention_reference,
)

Args = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]
LENS = (1, 15, 16, 37, 50)  # with block size 16: 1, size - 1, size, a few blocks


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Case:
    q: torch.Tensor  # [D, heads, head_dim], strided like query[0].transpose(0, 1)
    k_blocks: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim]
    v_blocks: torch.Tensor
    tables: torch.Tensor  # [D, W] int64
    lens: torch.Tensor  # [D] int64
    scale: float

    def args(self) -> Args:
        return self.q, self.k_blocks, self.v_blocks, self.tables, self.lens, self.scale

    def to(self, dtype: torch.dtype) -> Case:
        return Case(
            self.q.to(dtype), self.k_blocks.to(dtype), self.v_blocks.to(dtype),
            self.tables, self.lens, self.scale,
        )  # fmt: skip


def make_case(
    lens: tuple[int, ...],
    shape: Shape,
    *,
    block_size: int = 16,
    spare_blocks: int = 3,
    seed: int = 0,
    device: str = "cpu",
) -> Case:
    """Rows with disjoint, shuffled blocks; table entries past a row's blocks are random
    valid ids (the kernel must not read them); a few blocks belong to no row."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_row = [-(-n // block_size) for n in lens]
    width = max(blocks_per_row, default=0) + 1
    num_blocks = sum(blocks_per_row) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(lens), width), generator=gen)
    used = 0
    for row, count in enumerate(blocks_per_row):
        tables[row, :count] = order[used : used + count]
        used += count
    dims = (num_blocks, block_size, shape.kv_heads, shape.head_dim)
    k_blocks = torch.randn(dims, generator=gen)
    v_blocks = torch.randn(dims, generator=gen)
    # the step's packed queries, decode rows first, seen as [D, heads, head_dim]
    packed = torch.randn(shape.heads, len(lens) + 2, shape.head_dim, generator=gen)
    q = packed.transpose(0, 1)[: len(lens)]
    return Case(
        q.to(device), k_blocks.to(device), v_blocks.to(device), tables.to(device),
        torch.tensor(lens, dtype=torch.int64, device=device), shape.head_dim**-0.5,
    )  # fmt: skip


def per_row_attention(case: Case) -> torch.Tensor:
    """Softmax written out row by row and head by head, in float64."""
    q, k_blocks, v_blocks, tables, lens, scale = case.args()
    size, kv_heads = k_blocks.shape[1], k_blocks.shape[2]
    group = q.shape[1] // kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for d in range(q.shape[0]):
        n = int(lens[d])
        positions = torch.arange(n)
        blocks = tables[d, positions // size]
        for h in range(q.shape[1]):
            k = k_blocks[blocks, positions % size, h // group].double()  # [n, head_dim]
            v = v_blocks[blocks, positions % size, h // group].double()
            weights = torch.softmax(k @ q[d, h].double() * scale, dim=0)
            out[d, h] = weights @ v
    return out


SHAPES = (
    Shape(heads=4, kv_heads=2, head_dim=16),  # GQA
    Shape(heads=4, kv_heads=2, head_dim=64),
    Shape(heads=2, kv_heads=2, head_dim=16),  # MHA
    Shape(heads=2, kv_heads=2, head_dim=64),
    Shape(heads=6, kv_heads=2, head_dim=24),  # group of 3, head size not a power of two
)


#: Launch plans the interpreter checks besides the default: one split with a tile of one
#: block; splits whose ranges end mid-block, with tiles spanning two and four blocks; more
#: splits than a short row has tiles (empty splits).
PLANS = (
    LaunchPlan(splits=1, tile=16, num_warps=4),
    LaunchPlan(splits=2, tile=32, num_warps=4),
    LaunchPlan(splits=4, tile=64, num_warps=8),
    LaunchPlan(splits=16, tile=16, num_warps=4),
)
LONG_LENS = (1, 16, 33, 130, 257)


def written_case(case: Case) -> tuple[Case, torch.Tensor, torch.Tensor]:
    """``case`` with the step's new key and value of each row (random, strided as
    ``key[0].transpose(0, 1)``) and the case whose cache holds them at each row's last
    position, as ``index_copy_`` writes them: ``(want, new_k, new_v)``."""
    rows, kv_heads, head_dim = case.q.shape[0], case.k_blocks.shape[2], case.k_blocks.shape[3]
    gen = torch.Generator().manual_seed(rows)
    news = [
        torch.randn(kv_heads, rows + 2, head_dim, generator=gen).to(case.q).transpose(0, 1)[:rows]
        for _ in range(2)
    ]
    size = case.k_blocks.shape[1]
    last = case.lens - 1
    slots = case.tables.gather(1, (last // size)[:, None])[:, 0] * size + last % size
    caches = []
    for blocks, new in zip((case.k_blocks, case.v_blocks), news, strict=True):
        cache = blocks.clone()
        cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, new)
        caches.append(cache)
    want = Case(case.q, caches[0], caches[1], case.tables, case.lens, case.scale)
    return want, news[0], news[1]


def write_check(case: Case, plan: LaunchPlan | None, tol: float) -> None:
    """The kernel with new keys and values: the cache as ``index_copy_`` leaves it, bit for
    bit, and the output of the reference on that cache."""
    want, new_k, new_v = written_case(case)
    k_blocks, v_blocks = case.k_blocks.clone(), case.v_blocks.clone()
    assert not torch.equal(k_blocks, want.k_blocks)  # the last slots held other keys
    got = paged_decode_attention(
        case.q, k_blocks, v_blocks, case.tables, case.lens, case.scale,
        plan=plan, new_k=new_k, new_v=new_v,
    )  # fmt: skip
    assert torch.equal(k_blocks, want.k_blocks) and torch.equal(v_blocks, want.v_blocks), plan
    reference = paged_decode_attention_reference(*want.to(torch.float32).args())
    error = (got.float() - reference).abs().max().item()
    assert error <= tol, (plan, case.q.dtype, error)


def interpreter_check() -> None:
    """Run in a process started with ``TRITON_INTERPRET=1``: the kernel on CPU tensors against
    the reference, float32 for every shape, float16 and bfloat16 for the first; then every
    plan of ``PLANS`` on longer rows, with block sizes 16 and 12 (tiles then cut blocks)."""
    for i, shape in enumerate(SHAPES):
        case = make_case(LENS, shape, seed=i)
        got = paged_decode_attention(*case.args())
        want = paged_decode_attention_reference(*case.args())
        error = (got - want).abs().max().item()
        assert got.shape == want.shape and got.dtype == torch.float32, shape
        assert error <= 1e-4, (shape, error)
    for j, plan in enumerate(PLANS):
        for block_size in (16, 12):
            case = make_case(LONG_LENS, SHAPES[j % 2], block_size=block_size, seed=10 + j)
            got = paged_decode_attention(*case.args(), plan=plan)
            error = (got - paged_decode_attention_reference(*case.args())).abs().max().item()
            assert error <= 1e-4, (plan, block_size, error)
            write_check(case, plan, 1e-4)
    write_check(make_case(LENS, SHAPES[4], seed=30), None, 1e-4)
    write_check(make_case(LENS, SHAPES[0], seed=31).to(torch.bfloat16), None, 2e-2)
    for plan in PLANS[:2]:  # written into the rows of a caller's buffer, one split or two
        case = make_case(LONG_LENS, SHAPES[1], seed=20)
        rows = case.q.shape[0]
        buffer = torch.full((rows + 3, *case.q.shape[1:]), 7.0)
        got = paged_decode_attention(*case.args(), plan=plan, out=buffer[1 : rows + 1])
        assert got.data_ptr() == buffer[1].data_ptr()
        error = (got - paged_decode_attention_reference(*case.args())).abs().max().item()
        assert error <= 1e-4 and bool((buffer[0] == 7).all() and (buffer[rows + 1 :] == 7).all())
    case = make_case(LENS, SHAPES[0])
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        low = case.to(dtype)
        got = paged_decode_attention(*low.args())
        want = paged_decode_attention_reference(*low.to(torch.float32).args())
        error = (got.float() - want).abs().max().item()
        assert got.dtype == dtype and error <= tol, (dtype, error)
    print("paged decode interpreter: ok")


def test_kernel_in_the_interpreter_equals_the_reference() -> None:
    assert_passes_in_interpreter(
        "tests.gpu.test_paged_decode_kernel", "paged decode interpreter: ok"
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_a_per_row_softmax(shape: Shape) -> None:
    case = make_case(LENS, shape)
    got = paged_decode_attention_reference(*case.args())
    assert (got.double() - per_row_attention(case)).abs().max().item() <= 1e-5


def test_launch_plan_fills_the_device_without_splits_shorter_than_two_tiles() -> None:
    # Llama-3.2-1B (32 heads, 8 kv heads, 64 wide) on 132 processors: 32 rows give 256
    # (row, kv head) pairs, so 4 splits for 528 programs, tiles of 32 positions.
    plan = launch_plan(32, 32, 8, 64, max_positions=8192, processors=132)
    assert plan == LaunchPlan(splits=4, tile=32, num_warps=4)
    # a short table caps the splits: 128 positions hold two splits of two 32-position tiles
    assert launch_plan(32, 32, 8, 64, max_positions=128, processors=132).splits == 2
    assert launch_plan(32, 32, 8, 64, max_positions=16, processors=132).splits == 1
    # one long row: as many splits as allowed
    assert launch_plan(1, 32, 8, 64, max_positions=1 << 16, processors=132).splits == 16
    # Llama-3-8B's 128-wide heads: more warps, the same product per warp
    eight_b = launch_plan(32, 32, 8, 128, max_positions=8192, processors=132)
    assert (eight_b.tile, eight_b.num_warps) == (32, 8)
    # many rows need no split
    assert launch_plan(512, 32, 8, 64, max_positions=8192, processors=132).splits == 1


def test_plans_that_are_not_powers_of_two_are_refused() -> None:
    pytest.importorskip("triton")
    case = make_case(LENS, SHAPES[0])
    for plan in (LaunchPlan(3, 16, 4), LaunchPlan(2, 24, 4), LaunchPlan(0, 16, 4)):
        with pytest.raises(ValueError, match="powers of two"):
            paged_decode_attention(*case.args(), plan=plan)


def test_an_out_buffer_of_another_shape_or_layout_is_refused() -> None:
    pytest.importorskip("triton")
    case = make_case(LENS, SHAPES[0])
    for out in (
        torch.empty(case.q.shape[0] + 1, *case.q.shape[1:]),
        torch.empty(case.q.shape, dtype=torch.float16),
        torch.empty(*case.q.shape[:2], 2 * case.q.shape[2])[..., ::2],
    ):
        with pytest.raises(ValueError, match="out"):
            paged_decode_attention(*case.args(), out=out)


def test_new_keys_without_values_or_of_another_shape_are_refused() -> None:
    pytest.importorskip("triton")
    case = make_case(LENS, SHAPES[0])
    new = torch.zeros(len(LENS), 2, 16)
    for k, v in (
        (new, None),
        (None, new),
        (new, new[:2]),
        (new, new.double()),
        (new[..., :8],) * 2,
    ):
        with pytest.raises(ValueError, match="new_k and new_v"):
            paged_decode_attention(*case.args(), new_k=k, new_v=v)


def test_available_only_on_cuda() -> None:
    assert not available("cpu")
    assert not available(torch.device("cpu"))


def test_no_rows_launch_nothing() -> None:
    pytest.importorskip("triton")
    case = make_case((), SHAPES[0])
    assert paged_decode_attention(*case.args()).shape == (0, 4, 16)


def test_inconsistent_inputs_are_refused() -> None:
    case = make_case(LENS, SHAPES[0])
    q, k, v, tables, lens, scale = case.args()
    bad = [
        (q[:, :3], k, v, tables, lens),  # heads not a multiple of kv_heads
        (q[..., :8], k, v, tables, lens),  # head_dim differs
        (q, k, v[:, :8], tables, lens),  # value blocks of another shape
        (q, k, v, tables[:2], lens),  # a table per row
        (q, k, v, tables.int(), lens),  # int64 ids
        (q, k, v.double(), tables, lens),  # one dtype
    ]
    for args in bad:
        with pytest.raises(ValueError):
            paged_decode_attention_reference(*args, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3), (torch.float32, 1e-4)]
)
def test_kernel_on_the_gpu_equals_the_reference(dtype: torch.dtype, tol: float) -> None:
    assert available("cuda")
    lens = (1, 15, 16, 17, 100, 511, 1000, 2048)
    for shape in (Shape(heads=8, kv_heads=2, head_dim=128), Shape(4, 4, 64)):
        case = make_case(lens, shape, device="cuda").to(dtype)
        want = paged_decode_attention_reference(*case.to(torch.float32).args())
        # every plan in bfloat16, the serving dtype; the default plan in the others (each plan
        # and dtype is a compilation, and make gpu-check has a budget)
        for plan in (None, *PLANS) if dtype == torch.bfloat16 else (None,):
            got = paged_decode_attention(*case.args(), plan=plan)
            error = (got.float() - want).abs().max().item()
            assert got.dtype == dtype and error <= tol, (shape, dtype, plan, error)
            write_check(case, plan, tol)  # and writing the rows' new keys and values


if __name__ == "__main__":
    interpreter_check()
