"""The composition root, which builds and wires everything; imports anything but local and cli."""
