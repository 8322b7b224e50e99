"""Online fine-tuning on the model's own trials: the trial records, the stream's online sets and a
fit with the ``OnlineTrials`` callback."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
from helpers import tiny_backbone, tiny_datamodule
from test_data import _decode, _synthetic

from icrl_lightning.backbones import build_tokenizer
from icrl_lightning.callbacks import OnlineTrials, trial_episodes
from icrl_lightning.checks import InputError
from icrl_lightning.data import ReplayStream
from icrl_lightning.evaluation import EvalProtocol
from icrl_lightning.module import ICRLModule
from icrl_lightning.serialize import Serializer


@pytest.fixture(scope="module")
def compact():
    return Serializer(build_tokenizer("compact"), "compact")


def test_trial_episodes_rebuild_rewards_and_endings():
    rows = ("SFH", "FFG")  # tiles 0 1 2 / 3 4 5: hole 2, goal 5
    paths = [[0, 1, 2], [0, 3, 4, 5], [0, 0, 0]]
    actions = [[2, 2], [1, 2, 2], [0, 0]]
    eps = trial_episodes(rows, paths, actions, max_episode_steps=2)
    assert [e["rewards"] for e in eps] == [[0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0]]
    assert [e["terminated"] for e in eps] == [True, True, False]  # hole, goal, time limit
    assert [e["truncated"] for e in eps] == [False, False, True]
    assert eps[1]["observations"] == [0, 3, 4, 5] and eps[1]["actions"] == [1, 2, 2]


def test_stream_draws_online_trials_whole_and_in_order(compact):
    episodes, weights, _ = _synthetic(compact, n_maps=3, n_eps=30)
    kwargs = dict(seq_len=400, pad_id=compact.pad_id, num_sequences=6, set_size=(2, 4), seed=0)
    offline = _decode(list(ReplayStream(episodes, weights, **kwargs)), compact)
    st = ReplayStream(episodes, weights, **kwargs)
    # Without online_fraction a buffered trial changes nothing (the draws are the same).
    st.online.append([episodes[7 % 3][j] for j in range(3)])
    assert _decode(list(st), compact) == offline
    # A trial of map 9, episodes 0..9 in the order played; every set is online with fraction 1.
    trial, _, _ = _synthetic(compact, n_maps=10, n_eps=10)
    st.online, st.online_fraction = [trial[9]], 1.0
    got = _decode(list(st), compact)
    assert {m for m, _ in got} == {9}
    assert [j for _, j in got[:10]] == list(range(10))
    # Half the sets online: both kinds appear.
    st.online_fraction = 0.5
    maps = {m for m, _ in _decode(list(st), compact)}
    assert 9 in maps and maps - {9}


@pytest.mark.parametrize("bad", [{"every_n_steps": 0}, {"fraction": 1.5}, {"maps": 0}, {"buffer": 0}])
def test_online_trials_rejects_bad_settings(bad):
    with pytest.raises(InputError, match=f"OnlineTrials.{next(iter(bad))}"):
        OnlineTrials(**bad)


def test_fit_with_online_trials_feeds_the_stream(tiny_data_dir, tmp_path):
    protocol = EvalProtocol(max_episode_steps=30, schedule=[0.0, 0.5, 1.0, 1.0])
    module = ICRLModule(backbone=tiny_backbone(), seq_len=256, evaluation=protocol)
    data = tiny_datamodule(tiny_data_dir)
    online = OnlineTrials(every_n_steps=2, start_step=2, maps=3, fraction=1.0, buffer=4)
    trainer = L.Trainer(max_steps=6, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[online],
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    stream = trainer.train_dataloader.dataset
    # Rounds at steps 2 and 4 (3 trials each), the buffer keeps the newest 4.
    assert len(stream.online) == 4 and stream.online_fraction == 1.0
    for trial in stream.online:
        assert len(trial) == 4  # one episode per schedule entry
        for e in trial:
            assert len(e.actions) == len(e.q_pos) >= 1 and np.isin(e.actions, range(4)).all()
            assert e.optimal.shape == (len(e.actions), 4)  # the map's shortest-path moves, for cql_target=oracle
    assert trainer.callback_metrics["online/trials"] == 4


def test_online_trials_need_the_main_process(tiny_data_dir, tmp_path):
    module = ICRLModule(backbone=tiny_backbone(), seq_len=256,
                        evaluation=EvalProtocol(max_episode_steps=30, schedule=[1.0]))
    data = tiny_datamodule(tiny_data_dir, num_workers=1)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[OnlineTrials()],
                        default_root_dir=tmp_path)
    with pytest.raises(InputError, match="num_workers=0"):
        trainer.fit(module, datamodule=data)
