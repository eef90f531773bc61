"""Train the Delta Mapper from the run's stores: `deltaedit run train-mapper --config FILE`.

    codes + clip_images ┐
                        ├─ row cache (one pass, shard by shard) ─ pairs ─ fit ─► <root>/mapper/
    samples + clip_samples ┘                          (the straightforward baseline: <root>/mapper_straightforward/)

The flow body is ``flows.training``'s: a rerun continues from the last checkpoint; ``overwrite`` starts over;
with ``train_mapper.workers > 1`` the same ``fit`` runs on Ray Train (torch DDP; gloo on CPU), each worker on
its own slice of the data.
"""

from __future__ import annotations

from flows.training import TrainingFlow, training_flow
from tasks.layout import mapper_dir
from tasks.train.mapper import MapperTrainer
from tasks.train.mapper_data import RowCache, build_row_cache

train_mapper_flow = training_flow(
    TrainingFlow(
        name="train-mapper",
        section="train_mapper",
        tag="mapper",
        build_cache=build_row_cache,
        open_cache=RowCache,
        trainer=MapperTrainer,
        out_dir=lambda tm: mapper_dir(tm.model),
    )
)
