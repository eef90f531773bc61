"""Infrastructure: config, stores, Ray pools, Prefect runtime glue and the CLI."""
