"""cmoe.reference_models — the Uni-Med recipe (planned: issue "Uni-Med reference recipe"). Not implemented yet."""
