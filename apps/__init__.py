"""The paper's two applications and the report: the only code that uses both stages."""
