"""Champion and challenger: the rollout's state and record (state), its checks (checks) and the
simulations that tune them (simulation). Flask-free; web/rollout.py runs it inside the app."""
