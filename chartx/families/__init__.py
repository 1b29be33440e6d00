"""The model families: each owns its modules and everything else that differs between them
(chartx.families.base.Family); chartx.families.registry looks one up by config.model.family."""
