"""Label next: rounds of the predictions most worth a person's label, and feedback checked before it trains."""
