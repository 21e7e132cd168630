"""absl drivers: flags -> `dpfl_tff` configs -> library calls."""

import os

# Keep TensorFlow's C++ start-up chatter off the console unless asked for.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
