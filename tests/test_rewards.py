import pytest
import torch

from common.rewards import overlong_penalty


def test_overlong_penalty_hand_values():
    # max_len 20, buffer 4 -> buffer starts after 16 tokens
    # 10, 16: no penalty; 18: (16 - 18) / 4 = -0.5; 20: (16 - 20) / 4 = -1; 25 > 20: -1
    out = overlong_penalty([10, 16, 18, 20, 25], max_len=20, buffer_len=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


def test_overlong_penalty_factor_scales_buffer_and_overflow():
    # factor 0.5: 17 -> (16 - 17) / 4 * 0.5 = -0.125; 19 -> -3/4 * 0.5 = -0.375; 21 -> -0.5
    out = overlong_penalty(torch.tensor([17, 19, 21]), max_len=20, buffer_len=4, factor=0.5)
    torch.testing.assert_close(out, torch.tensor([-0.125, -0.375, -0.5]))


def test_overlong_penalty_is_monotone_and_bounded():
    lengths = torch.arange(0, 40)
    out = overlong_penalty(lengths, max_len=30, buffer_len=10, factor=2.0)
    assert (out[1:] <= out[:-1]).all()
    assert out.max() == 0.0 and out.min() == -2.0
    assert (out[:21] == 0).all() and (out[21:31] < 0).all() and (out[31:] == -2.0).all()


@pytest.mark.parametrize("buffer_len", [0, -1, 21])
def test_overlong_penalty_rejects_bad_buffer(buffer_len):
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty([5], max_len=20, buffer_len=buffer_len)
