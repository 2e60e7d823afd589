"""cmoe.reference_models — the Uni-Med recipe on cmoe (`cmoe.reference_models.unimed`).

So far: task identifiers, the prompt template and the box text format. Model assembly, data loaders,
training and evaluation are still to come (issue "Uni-Med reference recipe").
"""
