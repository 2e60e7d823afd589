"""cmoe.plugins — pluggy plugins that attach the connector to vision encoders and LLMs (planned: issue
"Plugin system"). Not implemented yet; nothing here is registered."""
