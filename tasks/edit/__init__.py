"""The edit stage: planning (plan), the models an actor holds (builder), one shard of edits (processor), the retrieval memory (memory) and the DeltaEdit-D decoder (diffusion)."""
