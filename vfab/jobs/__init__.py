"""Jobs: their states, their persistent store and the queue that plots them."""
