"""Training: one loop for every model (trainer), the Delta Mapper (mapper) and DeltaEdit-D decoder (diffusion), their row caches (row_cache, mapper_data, diffusion_data) and checkpoints."""
