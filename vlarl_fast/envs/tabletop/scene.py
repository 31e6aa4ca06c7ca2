"""The tabletop scene, generated as MJCF (no asset files).

One model serves every task: a table, three free cubes (red, green, blue), two flat target
squares (yellow, purple), and a gripper. The gripper is a mocap hand with two mocap fingers:
its pose follows the delta end-effector commands exactly, as an operational-space controlled
arm does in LIBERO, without simulating the arm. Fingers collide, so the closed gripper pushes
cubes. Closing the fingers around a cube attaches it to the hand (see ``env.py``).
"""
from __future__ import annotations

CUBE_HALF = 0.02          # 4 cm cubes: ~4-5 px wide in a 64 px agent view
ZONE_HALF = 0.05          # 10 cm target squares
TABLE_TOP = 0.0
CUBES = {"red": (0.85, 0.12, 0.1), "green": (0.15, 0.7, 0.2), "blue": (0.15, 0.3, 0.9)}
ZONES = {"yellow": (0.95, 0.85, 0.15), "purple": (0.6, 0.2, 0.75)}
FINGER_HALF = (0.01, 0.01, 0.03)     # finger box half-sizes (x, y, z)
PALM_HALF = (0.015, 0.05, 0.01)
OPEN_WIDTH = 0.09         # distance between finger centres when open
CLOSED_WIDTH = 2 * CUBE_HALF + 2 * FINGER_HALF[1]  # finger centres when touching a held cube
EMPTY_WIDTH = 2 * FINGER_HALF[1]                  # fingers closed on nothing
# Workspace of the fingertip centre (x forward from the camera's view, y left-right).
WORKSPACE_LOW = (-0.22, -0.26, 0.02)
WORKSPACE_HIGH = (0.22, 0.26, 0.25)


def _rgba(c, a=1.0):
    return f"{c[0]} {c[1]} {c[2]} {a}"


def scene_xml() -> str:
    cubes = "\n".join(
        f"""    <body name="{name}" pos="0 0 {CUBE_HALF}">
      <freejoint name="{name}_joint"/>
      <geom name="{name}_geom" type="box" size="{CUBE_HALF} {CUBE_HALF} {CUBE_HALF}" rgba="{_rgba(c)}"
            mass="0.05" friction="1.0 0.01 0.001" condim="3"/>
    </body>""" for name, c in CUBES.items())
    zones = "\n".join(
        f"""    <body name="zone_{name}" mocap="true" pos="0 0 0.0005">
      <geom name="zone_{name}_geom" type="box" size="{ZONE_HALF} {ZONE_HALF} 0.0005" rgba="{_rgba(c)}"
            contype="0" conaffinity="0"/>
    </body>""" for name, c in ZONES.items())
    fx, fy, fz = FINGER_HALF
    px, py, pz = PALM_HALF
    return f"""<mujoco model="vlarl_tabletop">
  <compiler angle="radian"/>
  <option timestep="0.005" iterations="20" ls_iterations="10">
    <flag warmstart="enable"/>
  </option>
  <visual>
    <global offwidth="256" offheight="256"/>
    <quality shadowsize="0" offsamples="0"/>
    <headlight ambient="0.45 0.45 0.45" diffuse="0.55 0.55 0.55" specular="0 0 0"/>
  </visual>
  <worldbody>
    <geom name="floor" type="plane" pos="0 0 -0.4" size="2 2 0.1" rgba="0.35 0.35 0.38 1"/>
    <geom name="table" type="box" pos="0 0 -0.02" size="0.3 0.34 0.02" rgba="0.62 0.5 0.38 1"
          friction="0.6 0.005 0.0001"/>
{zones}
{cubes}
    <body name="hand" mocap="true" pos="0 0 0.15">
      <geom name="palm" type="box" pos="0 0 {fz * 2 + pz}" size="{px} {py} {pz}" rgba="0.2 0.2 0.22 1"/>
      <camera name="wrist" pos="0 0 {fz * 2 + 2 * pz}" xyaxes="0 -1 0 1 0 0" fovy="75"/>
    </body>
    <body name="finger_left" mocap="true" pos="0 0.045 0.15">
      <geom name="finger_left_geom" type="box" pos="0 0 {fz}" size="{fx} {fy} {fz}" rgba="0.75 0.75 0.78 1"
            friction="1 0.01 0.001"/>
    </body>
    <body name="finger_right" mocap="true" pos="0 -0.045 0.15">
      <geom name="finger_right_geom" type="box" pos="0 0 {fz}" size="{fx} {fy} {fz}" rgba="0.75 0.75 0.78 1"
            friction="1 0.01 0.001"/>
    </body>
    <camera name="agentview" pos="0.55 0 0.55" xyaxes="0 1 0 -0.7 0 0.714" fovy="48"/>
  </worldbody>
</mujoco>
"""
