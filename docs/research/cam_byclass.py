import sys, torch
from gapnet import cam, data
from gapnet.train import load_checkpoint
torch.set_num_threads(2)
model, cfg, _ = load_checkpoint(sys.argv[1])
for size in (56, 84, 112):
    s, boxes = data.canvas_mnist(size, n=300, split="test", seed=0)
    r = cam.class_activation_maps(model, s.images)
    hit = cam.box_iou(cam.cam_boxes(r.maps, 0.2), boxes) >= 0.5
    w = boxes[:, 2] - boxes[:, 0]
    per = {c: round(float(hit[s.labels == c].float().mean()), 2) for c in range(10)}
    print(size, "all", round(float(hit.float().mean()), 3), "width>=10:", round(float(hit[w >= 10].float().mean()), 3),
          "n narrow", int((w < 10).sum()), "narrow acc", round(float(hit[w < 10].float().mean()), 3), per)
