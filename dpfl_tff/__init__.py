"""dpfl_tff: differentially private federated learning simulations on TFF."""
