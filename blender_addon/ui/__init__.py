"""What the artist sees: ``props`` (the settings stored in .blend files), ``preferences``
(engine location and set-up), ``operators`` (Generate, Re-generate Object, Cancel, labels),
``panels`` (sidebar, object properties, camera header) and ``overlay`` (boxes in the camera
view)."""
